"""Teachers as other toolkits ship them, made from a Keras model for the tests.

`onnx_teacher(model, path, layers)` writes the model as ONNX (through tf2onnx,
Keras' own ONNX export) with `logits` and each named layer as graph outputs,
as `torch.onnx.export(..., output_names=[...])` would; `nchw=True` makes the
graph take [B, C, H, W] and give its feature maps as [B, C, H, W] (a PyTorch
export's layout); `expects_255=True` makes it take 0-255 pixels.
`permutation=[...]` reorders its classes (logit j of the file is the model's
logit permutation[j]); `softmax=True` ends it in a softmax, so that its "logits"
output holds probabilities. `saved_model_teacher` writes the same function as a
SavedModel.
"""

import warnings

import keras
import numpy as np

from ardir_tf import models, precision


def _function(model, layers, nchw=False, expects_255=False, classes=None,
              permutation=None, softmax=False):
    view = models.expose(precision.float32_copy(model), list(layers))
    h, w, c = view.input.shape[1:]
    images = keras.Input((c, h, w) if nchw else (h, w, c), name="images")
    x = keras.layers.Permute((2, 3, 1))(images) if nchw else images
    if expects_255:
        x = keras.layers.Rescaling(1 / 255)(x)
    out = view(x)
    named = {}
    for name, value in out.items():
        if nchw and len(value.shape) == 4:
            value = keras.layers.Permute((3, 1, 2))(value)
        if name == "logits" and classes is not None:
            value = keras.layers.Dense(classes)(value)
        if name == "logits" and permutation is not None:
            order = np.asarray(permutation, np.int32)
            value = keras.layers.Lambda(lambda z: keras.ops.take(z, order, axis=-1))(value)
        named[name] = keras.layers.Activation(
            "softmax" if name == "logits" and softmax else "linear", name=name)(value)
    function = keras.Model(images, named)
    function(np.zeros([1, *images.shape[1:]], np.float32))  # Keras exports called models only
    return function


def onnx_teacher(model, path, layers=(), nchw=False, expects_255=False, classes=None,
                 permutation=None, softmax=False):
    with warnings.catch_warnings():  # tf2onnx's numpy-2 deprecation notices
        warnings.simplefilter("ignore")
        _function(model, layers, nchw, expects_255, classes, permutation, softmax).export(
            str(path), format="onnx", verbose=False)
    return str(path)


def saved_model_teacher(model, path, layers=(), nchw=False, softmax=False):
    _function(model, layers, nchw, softmax=softmax).export(str(path), format="tf_saved_model",
                                                           verbose=False)
    return str(path)
