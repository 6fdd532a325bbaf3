import numpy as np
import pytest
import keras

from ardir_tf import models

ALL = [("small_cnn", (8, 8, 1), {}), ("small_cnn", (28, 28, 1), {}),
       ("resnet18", (32, 32, 3), {"width": 8}),
       ("preact_resnet18", (32, 32, 3), {"width": 8}),
       ("wide_resnet", (32, 32, 3), {"depth": 10, "width": 1}),
       ("mobilenet_v2", (32, 32, 3), {"width_multiplier": 0.25})]


def trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name,params,kw", [
    # The PyTorch models of the robust-distillation literature, counted there.
    ("resnet18", 11_173_962, {}),
    ("wide_resnet", 46_160_474, {"depth": 34, "width": 10}),
    # PreActResNet-18 as in Rice et al. 2020 (final BN-ReLU; kuangliu's copy
    # drops that BN and has 1,024 fewer).
    ("preact_resnet18", 11_172_170, {}),
])
def test_parameter_counts_match_reference(name, params, kw):
    assert trainable_params(models.build(name, (32, 32, 3), 10, **kw)) == params


@pytest.mark.parametrize("name,shape,kw", ALL)
def test_named_stages_features_logits(name, shape, kw):
    model = models.build(name, shape, 7, **kw)
    stages = models.stage_names(model)
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)]
    assert len(stages) >= 2
    view = models.expose(model, stages + ["features"])
    x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    out = view(x)
    assert set(out) == {"logits", "features", *stages}
    assert out["logits"].shape == (2, 7)
    assert out["features"].shape[0] == 2 and len(out["features"].shape) == 2
    # Spatial size never grows from one stage to the next.
    sizes = [out[s].shape[1] for s in stages]
    assert sizes == sorted(sizes, reverse=True)
    np.testing.assert_allclose(out["logits"], model(x), atol=1e-5)


def test_normalisation_is_inside_the_model():
    model = models.build("small_cnn", (8, 8, 1), 10, mean=0.3, std=0.2)
    norm = model.get_layer("normalize")
    x = np.full((1, 8, 8, 1), 0.5, np.float32)
    np.testing.assert_allclose(norm(x), (0.5 - 0.3) / 0.2, rtol=1e-5)


@pytest.mark.parametrize("name,shape,kw", ALL[:3])
def test_config_round_trip(name, shape, kw):
    model = models.build(name, shape, 10, **kw)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(1).random((2, *shape), dtype=np.float32)
    np.testing.assert_allclose(clone(x), model(x), atol=1e-6)


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'.*resnet18"):
        models.build("vgg", (32, 32, 3), 10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.build("wide_resnet", (32, 32, 3), 10, depth=33)
    with pytest.raises(ValueError, match="num_classes"):
        models.build("small_cnn", (8, 8, 1), 1)
    with pytest.raises(ValueError, match="height, width, channels"):
        models.build("small_cnn", (64,), 10)


def test_expose_shares_weights():
    model = models.build("small_cnn", (8, 8, 1), 10, width=4)
    view = models.expose(model, ["stage1"])
    assert {id(w) for w in view.weights} == {id(w) for w in model.weights}


def test_expose_missing_layer_lists_the_layers():
    model = models.build("small_cnn", (8, 8, 1), 10, width=4)
    with pytest.raises(ValueError) as err:
        models.expose(model, ["stage5"])
    msg = str(err.value)
    assert "'stage5' not in model" in msg
    for name in ("stage1", "stage2", "features", "logits"):
        assert name in msg


def test_expose_model_loaded_from_keras_file(tmp_path):
    model = models.build("resnet18", (16, 16, 3), 10, width=4)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(2).random((2, 16, 16, 3), dtype=np.float32)
    a = models.expose(model, ["stage2", "stage4"])(x)
    b = models.expose(loaded, ["stage2", "stage4"])(x)
    for k in ("logits", "stage2", "stage4"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)


def test_expose_nested_and_sequential_models():
    inner = models.build("small_cnn", (8, 8, 1), 10, width=4)
    inputs = keras.Input((8, 8, 1))
    outer = keras.Model(inputs, keras.layers.Activation("linear", name="out")(inner(inputs)))
    x = np.random.default_rng(3).random((3, 8, 8, 1), dtype=np.float32)
    out = models.expose(outer, ["stage2", "out"])(x)
    np.testing.assert_allclose(out["stage2"], models.expose(inner, ["stage2"])(x)["stage2"],
                               atol=1e-6)
    np.testing.assert_allclose(out["logits"], outer(x), atol=1e-6)
    np.testing.assert_allclose(out["out"], outer(x), atol=1e-6)

    seq = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(3, 3, name="c"),
                            keras.layers.Flatten(), keras.layers.Dense(10, name="d")])
    out = models.expose(seq, ["c"])(x)
    assert out["c"].shape == (3, 6, 6, 3)
    np.testing.assert_allclose(out["logits"], seq(x), atol=1e-6)


def test_synchronize_batchnorm_keeps_the_function():
    model = models.build("small_cnn", (8, 8, 1), 10, width=4)
    synced = models.synchronize_batchnorm(model)
    bns = [l for l in synced.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(l.get_config()["synchronized"] for l in bns)
    x = np.random.default_rng(4).random((2, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(synced(x), model(x), atol=1e-6)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_build_with_sync_batchnorm_draws_the_same_weights(name):
    """So that one device and N replicas of a seeded run start alike (and so do
    the variables built after the models, e.g. the distiller's adapters)."""
    out = {}
    for sync in (False, True):
        keras.utils.set_random_seed(7)
        model = models.build(name, (8, 8, 3), 10, width=4, sync_batchnorm=sync)
        bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
        assert bns and all(l.synchronized == sync for l in bns)
        out[sync] = model.get_weights() + [keras.random.uniform((3,)).numpy()]
    for a, b in zip(out[False], out[True], strict=True):
        np.testing.assert_array_equal(a, b)
