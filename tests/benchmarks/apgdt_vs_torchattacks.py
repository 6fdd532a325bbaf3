"""APGD-T (or Square) on the digits student: ours against torchattacks on the same weights.

    # 1. In the project's environment: time ours, write the weights and images.
    python tests/benchmarks/apgdt_vs_torchattacks.py --ours /tmp/apgdt.npz
    # 2. In a separate venv with torch and torchattacks (never a project
    #    dependency), with the PyTorch replica of small_cnn from the peer folder:
    /tmp/peer-venv/bin/python tests/benchmarks/apgdt_vs_torchattacks.py \\
        --torch /tmp/apgdt.npz --peer_dir ../shared/peers

Both attack the same 360 test digits of the default run's student
(`--student`, default the committed tests/data/digits_run/student.keras) at
Linf eps 0.15 with APGD-T: 9 targets x 100 steps, one restart (or, with
`--attack square`, Square with 5,000 queries, p_init 0.8, margin loss). Ours runs
through `ardir_tf.evaluate.evaluate` (as `--attacks=standard` does; the time
includes tracing its one loop); torchattacks' `APGDT` runs as its users call
it. Step 2 first checks that the PyTorch replica's logits match the Keras
model's. Prints seconds and robust accuracy; asserts nothing. Run the two
steps back to back on an idle machine, one at a time.

Not the same work: torchattacks, like AutoAttack, attacks each target only on
the points earlier targets left standing, and skips points the model already
misclassifies; ours runs every target on every correctly classified point
(in one batched loop). On a robust model most points stand, so the work is
close; on a weak one torchattacks does less.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS, STEPS, TARGETS, QUERIES = 0.15, 100, 9, 5000


def ours(args):
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import ardir_tf
    from ardir_tf import evaluate as ev

    model = keras.models.load_model(args.student)
    (_, _), (x, y) = ardir_tf.data.digits()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(256)
    name = "apgd_t" if args.attack == "apgd_t" else "square"
    attack = ev.standard(EPS, apgd_steps=STEPS, n_targets=TARGETS, queries=QUERIES)[name]
    for _ in range(args.repeats):
        report = ev.evaluate(model, data, eps=EPS, attacks={name: attack},
                             sanity_examples=0, verbose=0)
        print(json.dumps({"side": "ardir_tf", "attack": name,
                          "seconds": report["attack_seconds"][name],
                          "robust_accuracy": report["robust_accuracy"][name],
                          "clean_accuracy": report["clean_accuracy"],
                          "tensorflow": tf.__version__}), flush=True)
    weights = {}
    for layer in model.layers:
        for w in layer.weights:
            weights[f"{layer.name}/{w.name}"] = w.numpy()
    np.savez(args.ours, x=x, y=y, logits=model.predict(x, verbose=0), **weights)


def theirs(args):
    import numpy as np
    import torch
    import torchattacks

    sys.path.insert(0, args.peer_dir)
    from torch_ard_step import ProjectSmallCNN

    torch.set_num_threads(2)
    saved = np.load(args.torch)
    width = saved["s1_conv1/kernel"].shape[-1]
    model = ProjectSmallCNN(1, 8, width=width)
    for s, stage in enumerate(model.stages, start=1):
        for i, block in enumerate(stage, start=1):
            conv, bn = block[0], block[1]
            conv.weight.data = torch.tensor(saved[f"s{s}_conv{i}/kernel"].transpose(3, 2, 0, 1))
            bn.weight.data = torch.tensor(saved[f"s{s}_bn{i}/gamma"])
            bn.bias.data = torch.tensor(saved[f"s{s}_bn{i}/beta"])
            bn.running_mean.data = torch.tensor(saved[f"s{s}_bn{i}/moving_mean"])
            bn.running_var.data = torch.tensor(saved[f"s{s}_bn{i}/moving_variance"])
    model.fc.weight.data = torch.tensor(saved["logits/kernel"].T)
    model.fc.bias.data = torch.tensor(saved["logits/bias"])
    model.eval()
    x = torch.tensor(saved["x"].transpose(0, 3, 1, 2))
    y = torch.tensor(saved["y"].astype(np.int64))
    with torch.no_grad():
        gap = float(np.abs(model(x).numpy() - saved["logits"]).max())
    if gap > 1e-3:
        raise SystemExit(f"the PyTorch replica's logits differ from Keras' by {gap}: "
                         "the weights did not map")
    if args.attack == "apgd_t":
        attack = torchattacks.APGDT(model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1,
                                    n_classes=10, seed=0)
    else:
        attack = torchattacks.Square(model, norm="Linf", eps=EPS, n_queries=QUERIES,
                                     n_restarts=1, p_init=0.8, loss="margin", seed=0)
    for _ in range(args.repeats):
        start = time.perf_counter()
        x_adv = torch.cat([attack(x[i: i + 256], y[i: i + 256]) for i in range(0, len(y), 256)])
        seconds = time.perf_counter() - start
        with torch.no_grad():
            robust = float((model(x_adv).argmax(1) == y).float().mean())
        print(json.dumps({"side": "torchattacks", "attack": args.attack,
                          "seconds": round(seconds, 2),
                          "robust_accuracy": robust, "logit_gap": gap,
                          "torch": torch.__version__,
                          "torchattacks": torchattacks.__version__}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", metavar="NPZ", help="time ardir_tf, then write NPZ")
    p.add_argument("--torch", metavar="NPZ", help="time torchattacks on NPZ's weights")
    p.add_argument("--peer_dir", help="folder holding torch_ard_step.py (with --torch)")
    p.add_argument("--student", default=os.path.join(ROOT, "tests", "data", "digits_run",
                                                     "student.keras"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--attack", choices=["apgd_t", "square"], default="apgd_t")
    args = p.parse_args()
    if bool(args.ours) == bool(args.torch):
        p.error("give one of --ours NPZ or --torch NPZ")
    if args.torch and not args.peer_dir:
        p.error("--torch needs --peer_dir (the folder of torch_ard_step.py)")
    ours(args) if args.ours else theirs(args)


if __name__ == "__main__":
    main()
