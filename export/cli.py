"""`ardir-serve`: the server from the command line, without TensorFlow.

    ardir-serve --workdir=runs/distill-digits-ardir          # <workdir>/export/student.onnx
    ardir-serve --export_dir=path/to/export --port=8500 --host=0.0.0.0
    ardir-serve --onnx_path=path/to/student.onnx --model_name=digits
    python -m export.cli ...                                 # the same, from a checkout

The serving flags of `python main.py --mode=serve` (flags.define_serve_flags),
the same server (export/server.py). It imports absl, numpy, onnxruntime,
aiohttp and prometheus_client, never TensorFlow, so it runs from a serving-only
install (requirements-serve.txt) and starts in well under a second plus ONNX
Runtime's load of the model.
"""

import os
import sys

from absl import app

import flags as cli

FLAGS = cli.FLAGS


def onnx_path(default_export_dir=None):
    """The .onnx the flags name: --onnx_path, else <export dir>/<model_name or
    student>.onnx, the export dir being --export_dir, <--workdir>/export, or
    `default_export_dir`. Raises ValueError when none is given or it is not there."""
    if FLAGS.onnx_path:
        return FLAGS.onnx_path
    export_dir = FLAGS.export_dir or (os.path.join(FLAGS.workdir, "export") if FLAGS.workdir
                                      else default_export_dir)
    if export_dir is None:
        raise ValueError("say which model to serve: --workdir (a run), --export_dir (an "
                         "export) or --onnx_path (an .onnx file)")
    path = os.path.join(export_dir, f"{FLAGS.model_name or 'student'}.onnx")
    if not os.path.isfile(path):
        raise ValueError(f"no exported model at {path}; run --mode=export first, or pass "
                         "--onnx_path (or --model_name, for an export of another name)")
    return path


def serve(default_export_dir=None, log=print):
    """Serves what the flags name until SIGTERM or SIGINT.

    Raises:
      ValueError: no model, or one the server cannot serve; OSError: a busy port.
    """
    from export import server
    path = onnx_path(default_export_dir)
    limits = server.Limits(
        max_batch=FLAGS.max_batch,
        max_body_bytes=int(FLAGS.max_body_mb * 2**20) if FLAGS.max_body_mb else None,
        batch_delay_ms=FLAGS.batch_delay_ms, max_in_flight=FLAGS.max_in_flight,
        body_timeout_s=FLAGS.body_timeout_s, idle_timeout_s=FLAGS.idle_timeout_s,
        max_connections=FLAGS.max_connections)
    server.serve(path, FLAGS.host, FLAGS.port, limits, log=log, name=FLAGS.model_name)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags are written --name=value",
              file=sys.stderr)
        sys.exit(2)
    try:
        serve(log=lambda message: print(message, flush=True))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def run():
    """The console script."""
    cli.define_serve_flags()
    cli.list_in_help(__doc__)
    app.run(main)


if __name__ == "__main__":
    run()
