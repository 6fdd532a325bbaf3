"""Deployment of a trained student: the third door.

    artifacts     SavedModel + ONNX + model card, parity-checked, written atomically
    parity        Keras vs SavedModel vs ONNX Runtime, clean and adversarial inputs
    repositories  the Triton model repository and TF Serving base path of an export
    server        an HTTP server on ONNX Runtime, batching, errors, routes
    open_inference, tf_serving, native
                  the protocols it speaks (KServe V2, TF Serving REST, its own)
    validate      the checks every request's images pass
    metrics       its Prometheus metrics
    cli           ardir-serve, the server from the command line

Modules are imported by name (`from export import artifacts`); only artifacts
and parity import TensorFlow, so the server runs where TensorFlow is not
installed.
"""
