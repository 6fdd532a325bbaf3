"""The PyTorch recipe end to end on digits: a robust PyTorch teacher, exported to
ONNX with named intermediate outputs, distilled into a Keras student by main.py.

Three commands, two environments (torch is never a dependency of this project):

    # 1. In this project's environment: the digits split as an .npz main.py reads.
    python tests/benchmarks/pytorch_teacher.py data /tmp/digits.npz
    # 2. In an environment with torch (and onnx, onnxscript): train a PGD-AT
    #    teacher in PyTorch and export it, NCHW, with its two stages as outputs.
    python tests/benchmarks/pytorch_teacher.py train /tmp/digits.npz /tmp/torch_teacher.onnx
    # 3. Back here: distil it (docs/teachers.md).
    python main.py --mode=distill --dataset=npz:/tmp/digits.npz \\
        --teacher=/tmp/torch_teacher.onnx --layers=stage1:block1,stage2:block2

`train` prints its time and the teacher's clean and PGD-10 accuracy (eps 0.15,
the digits threat model) measured in PyTorch, so they can be set beside what
main.py's pre-training check measures through ONNX Runtime.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS = 0.15


def write_data(path):
    sys.path.insert(0, ROOT)
    import numpy as np
    from ardir_tf import data
    (x_train, y_train), (x_test, y_test) = data.digits(seed=0)
    np.savez(path, x_train=x_train[..., 0], y_train=y_train, x_test=x_test[..., 0],
             y_test=y_test)
    print(f"wrote {path}: {len(y_train)} train and {len(y_test)} test digits")


def train(data_path, out, epochs, seed):
    import numpy as np
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    arrays = np.load(data_path)
    x = torch.tensor(arrays["x_train"], dtype=torch.float32)[:, None]  # NCHW, [0, 1]
    y = torch.tensor(arrays["y_train"], dtype=torch.long)
    xt = torch.tensor(arrays["x_test"], dtype=torch.float32)[:, None]
    yt = torch.tensor(arrays["y_test"], dtype=torch.long)

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    class Teacher(nn.Module):
        """Returns the logits and both blocks' feature maps (what the export names)."""

        def __init__(self, width=32):
            super().__init__()
            self.block1, self.block2 = block(1, width), block(width, 2 * width)
            self.fc = nn.Linear(2 * width, 10)

        def forward(self, images):
            b1 = self.block1((images - 0.5) / 0.5)
            b2 = self.block2(F.max_pool2d(b1, 2))
            return self.fc(b2.mean((2, 3))), b1, b2

    def pgd(model, images, labels, steps, step):
        adv = (images + torch.empty_like(images).uniform_(-EPS, EPS)).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv)[0], labels)
            grad, = torch.autograd.grad(loss, adv)
            adv = torch.min(torch.max(adv.detach() + step * grad.sign(), images - EPS),
                            images + EPS).clamp(0, 1)
        return adv.detach()

    model = Teacher()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = order[i: i + 64]
            model.eval()
            adv = pgd(model, x[idx], y[idx], 10, EPS / 4)
            model.train()
            loss = F.cross_entropy(model(adv)[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        clean = (model(xt)[0].argmax(1) == yt).float().mean().item()
    robust = (model(pgd(model, xt, yt, 10, EPS / 4))[0].argmax(1) == yt).float().mean().item()
    torch.onnx.export(model, (xt[:2],), out, input_names=["images"],
                      output_names=["logits", "block1", "block2"],
                      dynamic_axes={n: {0: "batch"} for n in ("images", "logits", "block1",
                                                             "block2")},
                      opset_version=17, dynamo=False)
    print(json.dumps({"torch": torch.__version__, "epochs": epochs, "train_seconds":
                      round(seconds, 1), "clean_accuracy": round(clean, 4),
                      "pgd10_accuracy": round(robust, 4), "eps": EPS, "onnx": out}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the digits split as an .npz (this project's env)")
    d.add_argument("out")
    t = sub.add_parser("train", help="train and export the PyTorch teacher (torch's env)")
    t.add_argument("data")
    t.add_argument("out")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.command == "data":
        write_data(args.out)
    else:
        train(args.data, args.out, args.epochs, args.seed)


if __name__ == "__main__":
    main()
