"""Deployment of a trained student: the third door.

    artifacts   SavedModel + ONNX + model card, parity-checked, written atomically
    parity      Keras vs SavedModel vs ONNX Runtime, clean and adversarial inputs
    server      an HTTP server on ONNX Runtime (imports no TensorFlow)

Modules are imported by name (`from export import artifacts`), so the server
can run where TensorFlow is not installed.
"""
