"""ardir_tf: adversarially robust distillation with internal representations.

Where each concept lives:
    models       model builders with named stages; expose(model, names)
    attacks      FGSM, PGD, CW, APGD-CE/-T, Square (Linf, L2) as functions
                 of (model_fn, x, y)
    losses       per-example losses: ce, kd_kl, ir_distance, pgd_at, trades,
                 ard, rslad, ardir
    distill      ARDIRDistiller: teacher + student, adversarial train_step
    adversarial  AdversarialTrainer: robust teachers (PGD-AT, TRADES)
    data         digits (embedded), tfds sets, user .npz; tf.data pipelines
    evaluate     robustness reports: attack presets, worst case, per class
    sanity       the checks every evaluation runs on itself
    report       the report as a table and an accuracy-vs-eps plot
    training     optimisers and schedules; resumable training phases
    workdir      a run's directory: atomic writes, never another run's
    distribute   choosing the tf.distribute strategy
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ardir_tf import attacks, data, distribute, evaluate, losses, models  # noqa: E402
from ardir_tf import report, sanity, training, workdir  # noqa: E402
from ardir_tf.adversarial import AdversarialTrainer  # noqa: E402
from ardir_tf.distill import ARDIRDistiller  # noqa: E402

__all__ = ["attacks", "data", "distribute", "evaluate", "losses", "models", "report",
           "sanity", "training", "workdir", "AdversarialTrainer", "ARDIRDistiller"]
