"""The library's names the flags offer, copied so that defining the flags imports
no TensorFlow: `ardir-tf --help` prints at once instead of after a 4-8 s
TensorFlow import, and a misspelt choice is refused before it.

The library stays the source of truth: tests/test_flags.py checks that every
tuple here equals the table it copies (named beside it).
"""

ARCHS = ("small_cnn", "resnet18", "preact_resnet18", "wide_resnet",
         "mobilenet_v2")                                    # models.BUILDERS
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped",
            "npz:PATH")                                     # data.NAMES
STRATEGIES = ("auto", "default", "mirrored", "mirrored_cpu",
              "multi_worker")                               # distribute.KINDS
TEACHER_LAYOUTS = ("auto", "nhwc", "nchw")                  # teachers.LAYOUTS
TEACHER_OUTPUTS = ("logits", "probabilities")               # teachers.OUTPUTS
METHODS = ("ardir", "ard", "rslad")                         # distill.METHODS
TEACHER_METHODS = ("pgd_at", "trades")    # adversarial.METHODS but "natural" (a baseline)
DISTANCES = ("normalized_mse", "mse", "cosine")             # losses.DISTANCES
IR_TEACHER_INPUTS = ("clean", "adv", "both")                # losses.IR_TEACHER_INPUTS
IR_STUDENT_INPUTS = ("adv", "both")                         # losses.IR_STUDENT_INPUTS
KD_TEACHER_INPUTS = ("clean", "adv")                        # distill.KD_TEACHER_INPUTS
ATTACK_OBJECTIVES = ("ce", "kl", "ardir")                   # distill.ATTACK_OBJECTIVES
OPTIMIZERS = ("sgd", "adam")                                # training.OPTIMIZERS
SCHEDULES = ("constant", "piecewise", "cosine")             # training.SCHEDULES
ATTACK_SUITES = ("fast", "standard")                        # evaluate.SUITES
DEFAULT_OPSET = 17                                          # export.artifacts.DEFAULT_OPSET
MIN_OPSET = 13                                              # export.artifacts.MIN_OPSET
