"""ardir_tf.precision: what --precision=auto chooses and why, and that every
number is measured on the float32 function whatever the training policy."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import ardir_tf
from ardir_tf import evaluate, precision
from conftest import batch


@pytest.mark.parametrize("cpu_flags, gpus, want, why", [
    ({"avx2", "fma"}, [], "float32", "this CPU has no native bfloat16"),
    ({"avx512f", "avx512_vnni"}, [], "float32", "neither AVX512_BF16 nor AMX"),
    ({"avx512f", "avx512_bf16"}, [], "mixed_bfloat16", "this CPU has AVX512_BF16"),
    ({"amx_bf16", "amx_tile"}, [], "mixed_bfloat16", "this CPU has AMX_BF16"),
    ({"avx512_bf16"}, [("Tesla T4", (7, 5))], "float32", r"compute capability 7\.5\) has no"),
    ({"avx2"}, [("NVIDIA A100", (8, 0))], "mixed_bfloat16", r"GPU \(NVIDIA A100\) has native"),
])
def test_auto_chooses_bfloat16_only_where_the_hardware_has_it(cpu_flags, gpus, want, why):
    """The training device decides: a GPU if there is one, else the CPU's flags."""
    policy, reason = precision.choose("auto", cpu_flags=cpu_flags, gpus=gpus)
    assert policy == want
    assert reason.startswith("auto: ") and re.search(why, reason), reason


def test_a_named_precision_is_itself_and_a_wrong_one_is_refused():
    assert precision.choose("float32", cpu_flags={"avx512_bf16"}, gpus=[]) == (
        "float32", "as asked")
    assert precision.choose("mixed_bfloat16", cpu_flags=set(), gpus=[])[0] == "mixed_bfloat16"
    with pytest.raises(ValueError, match="expected one of auto, float32"):
        precision.choose("bfloat16")


def test_flags_json_records_what_auto_chose_and_why(monkeypatch):
    """With the detection forced off (a CPU without bfloat16), auto is float32,
    and flags.json says so; on with AVX512_BF16, mixed_bfloat16. A named
    precision is recorded as asked."""
    from flags import precision_settings
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(precision, "_gpus", lambda: [])
    recorded = precision_settings("auto")
    assert recorded["precision"] == "float32"
    assert "no native bfloat16" in recorded["precision_reason"]
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512_bf16"})
    assert precision_settings("auto") == {
        "precision": "mixed_bfloat16", "precision_reason": "auto: this CPU has AVX512_BF16"}
    assert precision_settings("float32") == {"precision": "float32",
                                             "precision_reason": "as asked"}


def test_auto_is_the_default_and_a_resumed_run_keeps_its_precision(monkeypatch, tmp_path):
    """A run recorded in float32 (before auto was the default, or on a CPU
    without bfloat16) resumes in float32 on a CPU with it, when --precision is
    not given; given, it is another run. The reason alone never is."""
    import flags as cli
    from ardir_tf.workdir import Workdir, WorkdirError
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "_gpus", lambda: [])
    cli.define_flags()
    workdir = Workdir(str(tmp_path / "run"))
    try:
        cli.FLAGS(["main.py", f"--workdir={workdir.root}"])
        assert cli.FLAGS.precision == "auto"
        old = dict(cli.settings(), precision="float32")
        del old["precision_reason"]  # as a run before this version recorded it
        workdir.claim(old)
        assert cli.resume_precision(workdir.read_json(Workdir.SETTINGS)) is True
        assert cli.FLAGS.precision == "float32"
        assert workdir.claim(cli.settings()) is True  # resumed, not another run
        # A resumed run keeps the reason it recorded: it says why it started so.
        noted = dict(old, precision_reason="auto: this CPU has no native bfloat16")
        (tmp_path / "run" / "flags.json").write_text(json.dumps(noted))
        assert workdir.claim(cli.settings()) is True
        assert workdir.read_json(Workdir.SETTINGS) == noted
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["main.py", f"--workdir={workdir.root}", "--precision=mixed_bfloat16"])
        assert cli.resume_precision(workdir.read_json(Workdir.SETTINGS)) is False
        assert cli.FLAGS.precision == "mixed_bfloat16"
        with pytest.raises(WorkdirError, match="--precision was 'float32', now 'mixed_bfloat16'"):
            workdir.claim(cli.settings())
    finally:
        cli.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def bf16_model():
    keras.utils.set_random_seed(5)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


def test_the_float32_model_is_the_same_weights_computed_in_float32(bf16_model):
    x, _ = batch(32)
    copy = precision.float32_model(bf16_model)
    assert precision.compute_dtypes(bf16_model) == "mixed_bfloat16"
    assert precision.compute_dtypes(copy) == "float32" and copy is not bf16_model
    assert precision.float32_model(copy) is copy  # a float32 model is itself
    keras.utils.set_random_seed(5)
    reference = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    reference.set_weights(bf16_model.get_weights())
    np.testing.assert_array_equal(copy(x, training=False), reference(x, training=False))
    # bfloat16's 8-bit mantissa moves the logits; the copy does not have it.
    assert np.max(np.abs(bf16_model(x, training=False) - reference(x, training=False))) > 1e-3


def test_evaluation_runs_a_mixed_precision_model_in_float32(bf16_model):
    """On images where bfloat16 rounding flips the model's answer, labelled with
    the float32 function's answers, the evaluation finds every one right: it
    ran the float32 copy. And the report says so."""
    x = np.random.default_rng(1).random((4096, 8, 8, 1), np.float32)
    want = np.asarray(precision.float32_copy(bf16_model)(x, training=False)).argmax(1)
    flipped = np.asarray(bf16_model(x, training=False)).argmax(1) != want
    assert flipped.sum() >= 5  # else this test could not tell the two apart
    x, y = x[flipped], want[flipped].astype(np.int64)
    survived = evaluate.survivors(bf16_model, x, y, {"clean": None})["clean"]
    assert survived.all()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    report = evaluate.evaluate(bf16_model, data, 0.0, attacks=evaluate.fast(0.0, steps=1),
                               sanity_examples=0, verbose=0)
    assert report["clean_accuracy"] == 1.0
    assert (report["trained_in"], report["evaluated_in"]) == ("mixed_bfloat16", "float32")
    float32_report = evaluate.evaluate(precision.float32_copy(bf16_model), data, 0.0,
                                       attacks=evaluate.fast(0.0, steps=1),
                                       sanity_examples=0, verbose=0)
    assert "trained_in" not in float32_report


def _bf16_batchnorm_model():
    """pixels -> BatchNorm -> identity, under mixed_bfloat16, with moving
    statistics making scale 3 and shift -2.5, both exact in bfloat16."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((2,))
        bn = keras.layers.BatchNormalization(epsilon=1e-5)
        model = keras.Model(inputs, keras.layers.Activation("linear")(bn(inputs)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    bn.moving_variance.assign(np.full(2, 0.25 - 1e-5, np.float32))  # rsqrt(0.25) = 2
    bn.moving_mean.assign(np.ones(2, np.float32))
    bn.gamma.assign(np.full(2, 1.5, np.float32))
    bn.beta.assign(np.full(2, 0.5, np.float32))
    return model, bn


def test_the_inference_view_computes_batchnorm_in_bfloat16():
    """3 * (1 + 2**-7) - 2.5: in float32 (Keras' BatchNorm) 0.5234375, exact in
    bfloat16 too; computed in bfloat16, 3 * (1 + 2**-7) rounds to 3.03125 first
    (bfloat16 has 8 significant bits) and the result is 0.53125."""
    model, bn = _bf16_batchnorm_model()
    view = precision.inference_view(model)
    x = np.array([[1 + 2 ** -7, 2.0]], np.float32)
    np.testing.assert_array_equal(tf.cast(model(x, training=False), tf.float32),
                                  [[0.5234375, 3.5]])
    np.testing.assert_array_equal(tf.cast(view(x, training=False), tf.float32),
                                  [[0.53125, 3.5]])
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in view.layers)
    # It shares the weights: what training changes, the view computes with.
    bn.beta.assign(np.full(2, 1.5, np.float32))
    np.testing.assert_array_equal(tf.cast(view(x, training=False), tf.float32)[0, 1], 4.5)


def test_the_inference_view_is_the_model_itself_outside_bfloat16(bf16_model):
    keras.utils.set_random_seed(5)
    float32 = ardir_tf.models.build("small_cnn", (8, 8, 1), 10, width=4)
    assert precision.inference_view(float32) is float32

    class Subclassed(keras.Model):  # clone_model cannot rebuild it: left as it is
        def __init__(self):
            super().__init__(dtype="mixed_bfloat16")
            self.bn = keras.layers.BatchNormalization(dtype="mixed_bfloat16")

        def call(self, x, training=False):
            return self.bn(x, training=training)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 2), np.float32))
    assert precision.inference_view(subclassed) is subclassed
    view = precision.inference_view(bf16_model)
    assert view is not bf16_model
    assert len(view.weights) == len(bf16_model.weights)
    # A small CNN's logits: within bfloat16's rounding of the model's own.
    x, _ = batch(32)
    reference = np.asarray(precision.float32_copy(bf16_model)(x, training=False))
    for f in (bf16_model, view):
        assert np.max(np.abs(np.asarray(f(x, training=False)) - reference)) < \
            0.05 * np.max(np.abs(reference))


def test_a_study_cell_may_set_its_precision():
    from ardir_tf import study
    method = study.parse_method("ardir@precision=mixed_bfloat16")
    assert method.kwargs == {"precision": "mixed_bfloat16"}
    assert study.parse_method("pgd_at@precision=float32").kwargs == {"precision": "float32"}
    with pytest.raises(study.StudyError, match="precision"):
        study.parse_method("ard@precision=int8")


def test_the_masking_probe_and_the_deployed_files_attacks_use_the_float32_copy(
        bf16_model, monkeypatch):
    """The probe, on images where bfloat16 rounding flips the answer (labelled
    with the float32 answers), finds every one right; the deployed file's
    attacks take their gradients from the float32 copy of the surrogate."""
    from ardir_tf import deployed, masking
    x = np.random.default_rng(1).random((4096, 8, 8, 1), np.float32)
    want = np.asarray(precision.float32_copy(bf16_model)(x, training=False)).argmax(1)
    flipped = np.asarray(bf16_model(x, training=False)).argmax(1) != want
    assert flipped.sum() >= 5
    x, y = x[flipped], want[flipped].astype(np.int64)
    result = masking.probe(bf16_model, x, y, 1e-3, steps=(1,), apgd_steps=0, square_queries=1)
    assert result["clean"] == 1.0
    seen = []
    real = deployed.bpda
    monkeypatch.setattr(deployed, "bpda", lambda forward, surrogate: (
        seen.append(precision.compute_dtypes(surrogate)), real(forward, surrogate))[1])
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    forward = precision.float32_copy(bf16_model)
    deployed.evaluate_artifact(lambda z, training=False: forward(z, training=False),
                               bf16_model, data, 1e-3,
                               apgd_steps=1, n_targets=1, square_queries=1)
    assert seen == ["float32"]
