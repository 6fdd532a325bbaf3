"""ardir_tf: adversarially robust distillation with internal representations.

Where each concept lives:
    models       model builders with named stages; expose(model, names)
    attacks      FGSM, PGD, CW, APGD-CE/-T, FAB/FAB-T, Square (Linf, L2) as functions
                 of (model_fn, x, y)
    losses       per-example losses: ce, kd_kl, ir_distance, natural, pgd_at,
                 trades, ard, rslad, ardir (the objective: docs/objective.md)
    distill      ARDIRDistiller: teacher + student, adversarial train_step;
                 LayerPair(student=..., teacher=...)
    teachers     frozen teachers from .keras, SavedModel and ONNX files, and
                 the pre-training check of their accuracy (the SavedModel and
                 ONNX loaders: file_teachers)
    adversarial  AdversarialTrainer: robust teachers (PGD-AT, TRADES) and the
                 natural baseline
    data         digits (embedded), tfds sets, user .npz; tf.data pipelines
    evaluate     robustness reports: attack presets, worst case, per class
                 (what a killed evaluation keeps to resume: checkpoints)
    sanity       the checks every evaluation runs on itself
    masking      a direct probe of gradient masking, after training or during it
    deployed     the robustness of a deployed (INT8, float16) file, measured on it
    report       the report as a table and an accuracy-vs-eps plot
    study        method studies: the grid of cells, resumable (its report:
                 study_report, means over seeds, paired intervals)
    training     optimisers and schedules; resumable training phases
    workdir      a run's directory: atomic writes, never another run's
    distribute   choosing the tf.distribute strategy
    precision    float32 or mixed_bfloat16 (auto: where the hardware has it);
                 the float32 copy every number is measured on
    keras_compat every work-around of a Keras private API, in one place

Importing it changes nothing in the process (no environment variable, no
logger level, no random seed); set TF_CPP_MIN_LOG_LEVEL yourself before
TensorFlow is imported to quieten its C++ start-up lines.
"""

from ardir_tf import attacks, data, distribute, evaluate, losses, masking, models
from ardir_tf import precision, report, sanity, study, teachers, training, workdir
from ardir_tf.adversarial import AdversarialTrainer
from ardir_tf.distill import ARDIRDistiller, LayerPair

__all__ = ["attacks", "data", "distribute", "evaluate", "losses", "masking", "models",
           "precision", "report", "sanity", "study", "teachers", "training", "workdir",
           "AdversarialTrainer", "ARDIRDistiller", "LayerPair"]
