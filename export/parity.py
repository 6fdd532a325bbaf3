"""Parity: is an exported model the same function as the Keras model it came from?

Robustness lives in small margins: an export whose logits drift, or that
computes at another precision, can flip labels on adversarial inputs while clean
accuracy looks unchanged. So every export compares each runtime with the Keras
reference on clean inputs and on PGD inputs crafted on the Keras model, at
batch size 1 and at a larger batch (kernels and fused ops may differ between
the two), and records for each comparison

    max_abs_logit_diff    max over examples and classes of |logit - reference|
    label_agreement       fraction of examples with the reference's argmax

An export passes when every max_abs_logit_diff is below TOLERANCE and every
label agrees.
"""

import numpy as np

TOLERANCE = 1e-4


def _run(fn, x, batch_size):
    return np.concatenate([np.asarray(fn(x[i:i + batch_size]), np.float64)
                           for i in range(0, len(x), batch_size)])


def compare(reference, runtimes, inputs, batch_sizes=(1, 64), single_examples=32,
            tolerance=TOLERANCE):
    """Compares `runtimes` with `reference` on every input set and batch size.

    Args:
      reference: fn(float32 [B, H, W, C]) -> logits [B, K], the Keras model.
      runtimes: {name: fn} of the same form (SavedModel, ONNX Runtime, ...).
      inputs: {name: float32 array [N, H, W, C]}, e.g. {"clean": x, "pgd": x_adv}.
      batch_sizes: the batch sizes to run at; batch size 1 runs on the first
        `single_examples` examples only (one call each), the others on all.
      tolerance: the largest max_abs_logit_diff that passes.

    Returns:
      {"tolerance", "passed", "checks": [{"runtime", "inputs", "batch_size",
      "examples", "max_abs_logit_diff", "label_agreement", "passed"}, ...]}.
    """
    checks = []
    for input_name, x in inputs.items():
        for batch_size in batch_sizes:
            xs = x[:single_examples] if batch_size == 1 else x
            want = _run(reference, xs, batch_size)
            for runtime, fn in runtimes.items():
                got = _run(fn, xs, batch_size)
                if got.shape != want.shape:
                    raise ValueError(f"{runtime} returned logits of shape {got.shape}; the "
                                     f"Keras model returns {want.shape}")
                diff = float(np.max(np.abs(got - want)))
                agree = float(np.mean(got.argmax(1) == want.argmax(1)))
                checks.append(dict(runtime=runtime, inputs=input_name, batch_size=batch_size,
                                   examples=len(xs), max_abs_logit_diff=diff,
                                   label_agreement=agree,
                                   passed=bool(diff < tolerance and agree == 1.0)))
    return dict(tolerance=tolerance, passed=all(c["passed"] for c in checks), checks=checks)


def failures(result):
    """One line per failed check of a `compare` result ([] when it passed)."""
    return [f"{c['runtime']} on {c['inputs']} inputs at batch size {c['batch_size']}: "
            f"max |logit diff| {c['max_abs_logit_diff']:.3g} (tolerance "
            f"{result['tolerance']:g}), labels agree on {c['label_agreement']:.2%}"
            for c in result["checks"] if not c["passed"]]


def format_table(result):
    """The checks as an aligned text table."""
    lines = [f"{'runtime':<12} {'inputs':<6} {'batch':>5} {'n':>5} {'max|dlogit|':>11} "
             f"{'labels':>7}"]
    for c in result["checks"]:
        lines.append(f"{c['runtime']:<12} {c['inputs']:<6} {c['batch_size']:>5} "
                     f"{c['examples']:>5} {c['max_abs_logit_diff']:>11.2e} "
                     f"{c['label_agreement']:>7.2%}{'' if c['passed'] else '  FAILED'}")
    return "\n".join(lines)
