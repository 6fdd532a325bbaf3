"""The export's smaller files of the same student, and what each measured.

    write(tmp, name, onnx_kinds, litert_kinds, ...)  writes them into the export
                                                     being made, returns the card's
                                                     "artifacts"
    format_table(artifacts)                          the same as a table for the log

ONNX (export/quantize.py), beside <name>.onnx:
    <name>.int8.onnx       static QDQ INT8, calibrated on training images
    <name>.float16.onnx    float16 weights and arithmetic, float32 in and out
LiteRT (export/litert.py), in litert/, where a mobile app's assets come from:
    <name>.tflite          float32
    <name>.float16.tflite  float16 weights
    <name>.int8.tflite     full integer INT8
    labels.txt             the class names, one a line (with class names)

Each file is measured on the export's parity images, on the file itself: its
size, median latency at batch 1 and 64 on this CPU, clean accuracy, and, given
`robustness(path)`, its worst case (ardir_tf.deployed.evaluate_artifact); every
one is compared with the float32 ONNX file on the same images, and a file whose
worst case falls more than `margin` below float32's is flagged in the card and
the log.
"""

import os
import time

import numpy as np

from export import litert, quantize

ONNX_KINDS = ("int8", "float16")


class VariantError(ValueError):
    """A variant the student's ops or the arguments do not allow."""


def _latency_ms(run, x, batch, repeats=20):
    """Median milliseconds of one `run` on `batch` images."""
    images = np.resize(x, (batch, *x.shape[1:])).astype(np.float32)
    run(images)  # warm-up (and, for LiteRT, the resize to this batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 3)


def _onnx_runner(path):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"images": x})[0]


def _litert_runner(path):
    model = litert.Model(path)
    return lambda x: model(x)[0]


def _write_one(tmp, name, fmt, kind, calibration):
    """Writes one variant; returns its path relative to `tmp`."""
    float_onnx = os.path.join(tmp, f"{name}.onnx")
    try:
        if fmt == "onnx":
            rel = f"{name}.{kind}.onnx"
            if kind == "int8":
                quantize.int8_onnx(float_onnx, os.path.join(tmp, rel), calibration)
            elif kind == "float16":
                quantize.float16_onnx(float_onnx, os.path.join(tmp, rel))
            else:
                raise VariantError(f"unknown ONNX quantization {kind!r}; expected "
                                   f"{' or '.join(ONNX_KINDS)}")
        else:
            rel = f"{litert.DIRECTORY}/{litert.file_name(name, kind)}"
            os.makedirs(os.path.join(tmp, litert.DIRECTORY), exist_ok=True)
            litert.convert(os.path.join(tmp, "saved_model"), os.path.join(tmp, rel), kind,
                           calibration)
    except (quantize.QuantizationError, litert.LiteRTError) as err:
        raise VariantError(str(err)) from None
    return rel


def write(tmp, name, onnx_kinds, litert_kinds, calibration, x, y, robustness=None,
          margin=0.02, class_names=None, log=None):
    """Writes the variants into `tmp` (an export being made: <name>.onnx and
    saved_model/ are there) and returns {key: facts}: "float32" (the float32 ONNX
    file, the reference), "int8" and "float16" (ONNX), "litert_float32",
    "litert_float16", "litert_int8". Each: file (relative to the export),
    format, bytes, latency_ms {"1", "64"}, clean_accuracy, n_examples, and with
    `robustness` worst_case_accuracy; the variants also the differences from
    float32 (max_abs_logit_diff_vs_float32, clean_accuracy_diff,
    worst_case_diff) and flagged.

    Raises:
      VariantError: a kind that does not exist, or a conversion the student's
        ops do not allow (one line).
    """
    log = log or (lambda message: None)
    x = np.asarray(x, np.float32)

    def facts(rel, fmt):
        path = os.path.join(tmp, rel)
        run = _onnx_runner(path) if fmt == "onnx" else _litert_runner(path)
        logits = run(x)
        out = {"file": rel, "format": fmt, "bytes": os.path.getsize(path),
               "latency_ms": {str(b): _latency_ms(run, x, b) for b in (1, 64)},
               "clean_accuracy": float((logits.argmax(1) == y).mean()),
               "n_examples": int(len(y))}
        if robustness is not None:
            out["worst_case_accuracy"] = robustness(path)["worst_case_accuracy"]
        return out, logits

    base, base_logits = facts(f"{name}.onnx", "onnx")
    out = {"float32": base}
    todo = [("onnx", k, k) for k in onnx_kinds] + \
        [("litert", k, f"litert_{k}") for k in litert_kinds]
    for fmt, kind, key in todo:
        rel = _write_one(tmp, name, fmt, kind, calibration)
        log(f"wrote {rel}" + (", measuring its robustness on the file"
                              if robustness is not None else ""))
        entry, logits = facts(rel, fmt)
        entry["max_abs_logit_diff_vs_float32"] = float(np.max(np.abs(logits - base_logits)))
        entry["clean_accuracy_diff"] = entry["clean_accuracy"] - base["clean_accuracy"]
        if robustness is not None:
            entry["worst_case_diff"] = entry["worst_case_accuracy"] - base["worst_case_accuracy"]
            entry["flagged"] = entry["worst_case_diff"] < -margin
            if entry["flagged"]:
                log(f"warning: {rel}'s worst case is {-entry['worst_case_diff']:.3f} below "
                    f"float32's (more than {margin})")
        out[key] = entry
    if litert_kinds and class_names:
        with open(os.path.join(tmp, litert.DIRECTORY, "labels.txt"), "w") as f:
            f.write("".join(f"{c}\n" for c in class_names))
    return out


def format_table(artifacts):
    """The card's "artifacts" as a table for the log."""
    rows = ["file                              bytes   ms@1  ms@64   clean   worst  vs float32",
            "-" * 81]
    for key, a in artifacts.items():
        worst = a.get("worst_case_accuracy")
        diff = "" if key == "float32" or worst is None else f"{a['worst_case_diff']:+.4f}" + (
            "  FLAGGED" if a.get("flagged") else "")
        rows.append(f"{a['file']:<30} {a['bytes']:>8,} {a['latency_ms']['1']:>6.2f} "
                    f"{a['latency_ms']['64']:>6.2f} {a['clean_accuracy']:>7.4f} "
                    f"{'-' if worst is None else f'{worst:.4f}':>7}  {diff}")
    return "\n".join(rows)
