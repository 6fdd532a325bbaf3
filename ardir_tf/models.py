"""Model builders with named internal representations, and `expose`.

Every builder returns a functional `keras.Model` that takes [0, 1] pixels (the
normalisation is a layer inside the model, so attacks, training and export all
speak pixel units) and returns logits. Internal representations are named
layers, never positions:

    stage1 ... stageN   output of each stage (the last layer of the stage)
    features            the pooled vector in front of the classifier
    logits              the classifier

`expose(model, names)` turns any such model (or one loaded from a `.keras` file,
or one nested inside another) into a model whose output is a dict
`{"logits": ..., name: ...}`, sharing the original's layers and weights.

Left out: ImageNet-sized variants (stems with stride and max-pool); every
builder here is the CIFAR form with a 3x3 stride-1 stem.
"""

import contextvars

import keras
from keras import layers

# PyTorch's BatchNorm momentum 0.1 is Keras' 0.9; the reference robust-training
# code is PyTorch, and Keras' 0.99 makes moving statistics lag on short runs.
_BN = dict(momentum=0.9, epsilon=1e-5)


# Set by build(sync_batchnorm=True) while a builder runs: the BN layers are
# made synchronised in place, so that building draws the same random numbers
# (and gives the same weights) with and without synchronisation.
_SYNCHRONIZED = contextvars.ContextVar("synchronized_batchnorm", default=False)


def _bn(name=None):
    return layers.BatchNormalization(name=name, synchronized=_SYNCHRONIZED.get(), **_BN)


def _conv(filters, kernel, stride=1, name=None, use_bias=False):
    return layers.Conv2D(filters, kernel, strides=stride, padding="same",
                         use_bias=use_bias, kernel_initializer="he_normal",
                         name=name)


def _inputs(input_shape, mean, std):
    """Pixel input in [0, 1] followed by per-channel (x - mean) / std."""
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be (height, width, channels), got {input_shape}")
    channels = input_shape[-1]
    mean = [float(mean)] * channels if isinstance(mean, (int, float)) else list(mean)
    std = [float(std)] * channels if isinstance(std, (int, float)) else list(std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got "
            f"mean={mean}, std={std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Normalization(mean=mean, variance=[s * s for s in std],
                             name="normalize")(inputs)
    return inputs, x


def _head(x, num_classes, inputs, name):
    x = layers.GlobalAveragePooling2D(name="features")(x)
    # float32 logits whatever the dtype policy: under mixed precision the
    # softmax, the losses and the attack's gradient stay out of float16.
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def small_cnn(input_shape=(8, 8, 1), num_classes=10, width=32,
              mean=0.5, std=0.5):
    """A small VGG-style CNN for 8x8 (digits) and 28x28 (MNIST) inputs.

    Two stages for inputs up to 16 pixels on a side, three above. Each stage is
    two 3x3 conv + BN + ReLU, then 2x2 max-pooling between stages; the channel
    count doubles per stage starting from `width`.
    """
    inputs, x = _inputs(input_shape, mean, std)
    n_stages = 2 if min(input_shape[:2]) <= 16 else 3
    for s in range(1, n_stages + 1):
        if s > 1:
            x = layers.MaxPooling2D(2, name=f"pool{s}")(x)
        filters = width * 2 ** (s - 1)
        for i in (1, 2):
            x = _conv(filters, 3, name=f"s{s}_conv{i}")(x)
            x = _bn(f"s{s}_bn{i}")(x)
            x = layers.ReLU(name=f"stage{s}" if i == 2 else f"s{s}_relu{i}")(x)
    return _head(x, num_classes, inputs, "small_cnn")


def _basic_block(x, filters, stride, prefix, out_name):
    """ResNet v1 basic block (He et al. 2016), CIFAR form."""
    shortcut = x
    y = _conv(filters, 3, stride, name=f"{prefix}_conv1")(x)
    y = _bn(f"{prefix}_bn1")(y)
    y = layers.ReLU(name=f"{prefix}_relu1")(y)
    y = _conv(filters, 3, 1, name=f"{prefix}_conv2")(y)
    y = _bn(f"{prefix}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, stride, name=f"{prefix}_proj")(x)
        shortcut = _bn(f"{prefix}_proj_bn")(shortcut)
    y = layers.Add(name=f"{prefix}_add")([y, shortcut])
    return layers.ReLU(name=out_name)(y)


def resnet18(input_shape=(32, 32, 3), num_classes=10, width=64,
             mean=0.5, std=0.5):
    """ResNet-18, CIFAR variant (3x3 stride-1 stem, no max-pool).

    With width=64 and 10 classes it has 11,173,962 trainable parameters, the
    count of the PyTorch model the robust-distillation papers use.
    """
    inputs, x = _inputs(input_shape, mean, std)
    x = _conv(width, 3, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(name="stem")(x)
    for s, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)], 1):
        x = _basic_block(x, width * mult, stride, f"s{s}b1", f"s{s}b1_out")
        x = _basic_block(x, width * mult, 1, f"s{s}b2", f"stage{s}")
    return _head(x, num_classes, inputs, "resnet18")


def _preact_block(x, filters, stride, prefix, out_name, dropout=0.0):
    """Pre-activation block (He et al. 2016b): BN-ReLU-conv, twice, plus shortcut.

    The projection shortcut reads the pre-activated input, as in the reference
    PreActResNet and WideResNet code.
    """
    pre = _bn(f"{prefix}_bn1")(x)
    pre = layers.ReLU(name=f"{prefix}_relu1")(pre)
    y = _conv(filters, 3, stride, name=f"{prefix}_conv1")(pre)
    y = _bn(f"{prefix}_bn2")(y)
    y = layers.ReLU(name=f"{prefix}_relu2")(y)
    if dropout:
        y = layers.Dropout(dropout, name=f"{prefix}_dropout")(y)
    y = _conv(filters, 3, 1, name=f"{prefix}_conv2")(y)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, stride, name=f"{prefix}_proj")(pre)
    return layers.Add(name=out_name)([y, shortcut])


def preact_resnet18(input_shape=(32, 32, 3), num_classes=10, width=64,
                    mean=0.5, std=0.5):
    """PreAct ResNet-18, CIFAR variant. Stage outputs are the residual sums;
    `features` pools the final BN-ReLU."""
    inputs, x = _inputs(input_shape, mean, std)
    x = _conv(width, 3, name="stem")(x)
    for s, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)], 1):
        x = _preact_block(x, width * mult, stride, f"s{s}b1", f"s{s}b1_out")
        x = _preact_block(x, width * mult, 1, f"s{s}b2", f"stage{s}")
    x = _bn("final_bn")(x)
    x = layers.ReLU(name="final_relu")(x)
    return _head(x, num_classes, inputs, "preact_resnet18")


def wide_resnet(input_shape=(32, 32, 3), num_classes=10, depth=34, width=10,
                dropout=0.0, mean=0.5, std=0.5):
    """WideResNet-depth-width (Zagoruyko & Komodakis 2016).

    WRN-34-10 (46,160,474 trainable parameters for 10 classes) is the usual
    robust teacher on CIFAR. depth must be 6n + 4.
    """
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"wide_resnet depth must be 6n + 4 (10, 16, 28, 34, ...), got {depth}")
    if width < 1:
        raise ValueError(f"wide_resnet width must be >= 1, got {width}")
    n = (depth - 4) // 6
    inputs, x = _inputs(input_shape, mean, std)
    x = _conv(16, 3, name="stem")(x)
    for s, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2)], 1):
        for b in range(1, n + 1):
            out = f"stage{s}" if b == n else f"s{s}b{b}_out"
            x = _preact_block(x, 16 * width * mult, stride if b == 1 else 1,
                              f"s{s}b{b}", out, dropout)
    x = _bn("final_bn")(x)
    x = layers.ReLU(name="final_relu")(x)
    return _head(x, num_classes, inputs, f"wrn_{depth}_{width}")


# (expansion t, channels c, blocks n, first stride s); stride 1 in the second
# row instead of ImageNet's 2, the usual CIFAR adaptation for 32x32 inputs.
_MOBILENET_V2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(input_shape=(32, 32, 3), num_classes=10, width_multiplier=1.0,
                 mean=0.5, std=0.5):
    """MobileNetV2 (Sandler et al. 2018), CIFAR variant (stride-1 stem).

    Seven stages (one per row of the paper's table), then a 1x1 conv to 1280
    channels, pooled into `features`.
    """
    def ch(c):
        return max(8, int(c * width_multiplier + 4) // 8 * 8)

    inputs, x = _inputs(input_shape, mean, std)
    x = _conv(ch(32), 3, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem")(x)
    for s, (t, c, n, stride) in enumerate(_MOBILENET_V2_CFG, 1):
        for b in range(1, n + 1):
            p = f"s{s}b{b}"
            inp, cin, st = x, x.shape[-1], stride if b == 1 else 1
            if t != 1:
                x = _conv(cin * t, 1, name=f"{p}_expand")(x)
                x = _bn(f"{p}_expand_bn")(x)
                x = layers.ReLU(6.0, name=f"{p}_expand_relu")(x)
            x = layers.DepthwiseConv2D(3, st, padding="same", use_bias=False,
                                       name=f"{p}_dw")(x)
            x = _bn(f"{p}_dw_bn")(x)
            x = layers.ReLU(6.0, name=f"{p}_dw_relu")(x)
            x = _conv(ch(c), 1, name=f"{p}_project")(x)
            name = f"stage{s}" if b == n else f"{p}_out"
            if st == 1 and cin == ch(c):
                x = _bn(f"{p}_project_bn")(x)
                x = layers.Add(name=name)([inp, x])
            else:
                x = _bn(name)(x)
    x = _conv(max(1280, ch(1280)), 1, name="head_conv")(x)
    x = _bn("head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu")(x)
    return _head(x, num_classes, inputs, "mobilenet_v2")


BUILDERS = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "wide_resnet": wide_resnet,
    "mobilenet_v2": mobilenet_v2,
}


def synchronize_batchnorm(model):
    """A copy of `model` (same weights) whose BatchNormalization layers are
    synchronised across replicas.

    Under a tf.distribute strategy, plain BatchNormalization normalises each
    replica's slice of the batch with that slice's statistics, so N replicas
    do not compute what one device does on the whole batch; synchronised BN
    all-reduces the statistics and makes them equal (to float rounding). It
    costs one all-reduce per BN layer per step.
    """
    model = _as_functional(model)

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, layers.BatchNormalization):
            config["synchronized"] = True
        return layer.__class__.from_config(config)

    synced = keras.models.clone_model(model, clone_function=clone)
    synced.set_weights(model.get_weights())
    return synced


def build(name, input_shape, num_classes, sync_batchnorm=False, **kwargs):
    """Builds the architecture `name` (a key of BUILDERS) for `input_shape`.

    Args:
      name: one of "small_cnn", "resnet18", "preact_resnet18", "wide_resnet",
        "mobilenet_v2".
      input_shape: (height, width, channels) of [0, 1] pixel inputs.
      num_classes: number of logits.
      sync_batchnorm: synchronise BatchNorm statistics across replicas (see
        `synchronize_batchnorm`); makes N replicas train like one device.
      **kwargs: builder options (width, depth, mean, std, ...).

    Returns:
      A functional keras.Model mapping pixels to logits, with named stages.
    """
    if name not in BUILDERS:
        raise ValueError(
            f"unknown architecture {name!r}; valid names: {', '.join(BUILDERS)}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    token = _SYNCHRONIZED.set(bool(sync_batchnorm))
    try:
        return BUILDERS[name](input_shape=tuple(input_shape), num_classes=int(num_classes),
                              **kwargs)
    finally:
        _SYNCHRONIZED.reset(token)


def stage_names(model):
    """Names of the `stageN` layers of `model`, in order."""
    names = [l.name for l in model.layers if l.name.startswith("stage")
             and l.name[5:].isdigit()]
    return sorted(names, key=lambda n: int(n[5:]))


def _as_functional(model):
    """A Sequential model rewritten as a functional one sharing its layers."""
    if not isinstance(model, keras.Sequential):
        return model
    if not model.built or model.inputs is None:
        raise ValueError(
            f"Sequential model {model.name!r} has no input shape yet; build it "
            "(or give it an Input layer) before exposing its layers")
    inputs = keras.Input(shape=model.inputs[0].shape[1:], name="pixels")
    x = inputs
    for layer in model.layers:
        x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def _all_layer_names(model, prefix=""):
    names = []
    for layer in model.layers:
        names.append(prefix + layer.name)
        if isinstance(layer, keras.Model):
            names.extend(_all_layer_names(layer, prefix + layer.name + "/"))
    return names


def _find_nested(model, name):
    """The directly nested sub-model of `model` that contains layer `name`."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            sub = _as_functional(layer)
            if name in [l.name for l in sub.layers] or _find_nested(sub, name):
                return layer
    return None


def _input(model):
    # A single tensor, not a one-element list: Keras warns when a model built
    # on a list is called on a bare tensor.
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def expose(model, layer_names):
    """A model with the same input whose output is `{"logits": ..., name: ...}`.

    Args:
      model: a functional or Sequential keras.Model with one output (its
        logits), possibly loaded from a `.keras` file and possibly holding the
        named layers inside nested sub-models.
      layer_names: names of layers whose outputs to add to the dict.

    Returns:
      A functional keras.Model sharing `model`'s layers and weights: training it
      trains `model`.

    Raises:
      ValueError: a name is not a layer of `model` (the message lists those that
        are), or `model` does not have exactly one output.
    """
    model = _as_functional(model)
    layer_names = list(dict.fromkeys(layer_names))
    if "logits" in layer_names:
        layer_names.remove("logits")
    if len(model.outputs) != 1:
        raise ValueError(
            f"expose needs a model with one output (its logits); "
            f"{model.name!r} has {len(model.outputs)}")
    direct = {l.name for l in model.layers}
    missing = [n for n in layer_names
               if n not in direct and _find_nested(model, n) is None]
    if missing:
        raise ValueError(
            f"layer {', '.join(repr(n) for n in missing)} not in model "
            f"{model.name!r}; its layers are: {', '.join(_all_layer_names(model))}")
    nested = {}
    for n in layer_names:
        if n not in direct:
            nested.setdefault(id(_find_nested(model, n)), []).append(n)

    # Re-run the graph with the same layers and collect the named tensors on
    # the way; a nested model holding a named layer is called through an
    # exposed version of itself. (Reading `layer.output` instead would give the
    # tensor of the layer's first call, which is not this graph's when the
    # layer is shared or came from a Sequential model.)
    found = {}

    def call_function(layer, *args, **kwargs):
        names = nested.get(id(layer))
        if names is None:
            out = layer(*args, **kwargs)
            if layer.name in layer_names:
                found[layer.name] = out
            return out
        out = expose(layer, names)(*args, **kwargs)
        found.update({n: out[n] for n in names})
        return out["logits"]

    rerun = keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call_function)
    outputs = {"logits": rerun.outputs[0]}
    outputs.update({n: found[n] for n in layer_names})
    return keras.Model(_input(rerun), outputs, name=f"{model.name}_exposed")
