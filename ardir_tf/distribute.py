"""Choosing the tf.distribute strategy.

`strategy(kind, devices)`:

    auto          MirroredStrategy over every GPU when more than one is visible,
                  over `devices` logical CPU devices when devices > 1 and there
                  is no such GPU, else the default strategy (one device)
    default       the default strategy: one device
    mirrored      MirroredStrategy over `devices` GPUs when there are that many;
                  on a machine without GPUs, over `devices` logical devices split
                  from the CPU (for trying multi-device code on a laptop or in
                  tests; it is not faster there). More devices than GPUs on a
                  machine with GPUs is an error, never a silent CPU run
    mirrored_cpu  MirroredStrategy over `devices` logical devices split from the
                  CPU, asked for by name: even on a machine with GPUs (to try
                  multi-device code without them)
    multi_worker  MultiWorkerMirroredStrategy over the cluster TF_CONFIG names
                  (each worker mirrors over its own GPUs, or its CPU)

Splitting the CPU must happen before TensorFlow first touches a device, so call
this first.

`launch_local_cluster(command, num_workers, log_dir)` runs a command as N
workers on 127.0.0.1 with TF_CONFIG set for each, to try multi-worker training
on one machine. `is_chief(strategy)` says whether this process writes the run's
files.
"""

import json
import os
import signal
import socket
import subprocess
import time

import tensorflow as tf

KINDS = ("auto", "default", "mirrored", "mirrored_cpu", "multi_worker")


def _split_cpu(devices):
    cpu = tf.config.list_physical_devices("CPU")[0]
    # get_logical_device_configuration, not list_logical_devices: listing
    # starts the runtime, after which the CPU can no longer be split.
    if len(tf.config.get_logical_device_configuration(cpu) or [None]) < devices:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
        except RuntimeError as err:
            raise ValueError(f"cannot split the CPU into {devices} devices after TensorFlow "
                             f"has started: {err}") from None
    return [f"CPU:{i}" for i in range(devices)]


def tf_config():
    """The TF_CONFIG environment variable, parsed and checked, or None."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config["task"]
        if task["type"] not in ("worker", "chief") or not workers:
            raise KeyError("task.type")
        int(task["index"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"TF_CONFIG is not a cluster spec ({err}); expected "
                         '{"cluster": {"worker": ["host:port", ...]}, '
                         '"task": {"type": "worker", "index": i}}') from None
    return config


def strategy(kind="auto", devices=1):
    """The tf.distribute strategy of `kind` (see the module doc).

    Raises:
      ValueError: an unknown kind, devices < 1, devices > 1 with "default",
        more devices than the machine's GPUs (on a machine that has GPUs),
        "multi_worker" without TF_CONFIG, or a CPU that cannot be split any more.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown strategy {kind!r}; valid: {', '.join(KINDS)}")
    if int(devices) < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "multi_worker":
        if tf_config() is None:
            raise ValueError("strategy multi_worker needs TF_CONFIG (the cluster and this "
                             "worker's place in it); to try it on one machine, pass "
                             "--num_workers=N instead")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "default":
        if devices > 1:
            raise ValueError(f"strategy default runs on one device; devices={devices} "
                             "needs mirrored")
        return tf.distribute.get_strategy()
    if kind == "mirrored_cpu":
        return tf.distribute.MirroredStrategy(_split_cpu(devices))
    if kind == "auto":
        if len(gpus) > 1 and devices == 1:
            return tf.distribute.MirroredStrategy([f"GPU:{i}" for i in range(len(gpus))])
        if devices == 1:
            return tf.distribute.get_strategy()
    if len(gpus) >= devices:
        return tf.distribute.MirroredStrategy([f"GPU:{i}" for i in range(devices)])
    if gpus:
        raise ValueError(f"devices={devices}, but this machine has {len(gpus)} GPU(s); "
                         "logical CPU devices are only made on a machine without GPUs "
                         f"(training would silently run on the CPU): use devices <= "
                         f"{len(gpus)}, or ask for CPU devices by name with "
                         "strategy mirrored_cpu")
    return tf.distribute.MirroredStrategy(_split_cpu(devices))


def on_logical_cpus(strategy_):
    """Whether `strategy_` mirrors over several devices of which one is a CPU
    (logical devices split from it), where XLA (jit_compile) fails: it cannot
    reach the other devices' variables."""
    if strategy_.num_replicas_in_sync < 2 or isinstance(
            strategy_, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    return any("CPU" in d.upper() for d in strategy_.extended.worker_devices)


def barrier(strategy_):
    """Returns once every replica of `strategy_` (every worker of a cluster) got here."""
    @tf.function  # run eagerly, a collective warns of its overhead
    def all_reduce():
        return strategy_.reduce("SUM", strategy_.run(lambda: tf.ones([])), axis=None)
    all_reduce()


def is_chief(strategy_):
    """Whether this process writes the run's files: always, except on the
    non-chief workers of a multi-worker strategy."""
    resolver = getattr(strategy_, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                    "chief" not in resolver.cluster_spec().as_dict())


def free_ports(n, host="127.0.0.1"):
    """`n` distinct ports free on `host` right now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch_local_cluster(command, num_workers, log_dir, say=print, poll_seconds=0.5):
    """Runs `command` (an argv list) as `num_workers` workers on 127.0.0.1.

    Each worker gets a TF_CONFIG naming the whole cluster (free loopback ports)
    and its index; worker 0 is the chief. Every worker's output goes to
    log_dir/worker-I.log (its pid to worker-I.pid), and the chief's is also
    echoed through `say`. When a
    worker fails, the others are stopped (they would wait for it forever in
    the next collective). SIGTERM/SIGINT to this process stop every worker.

    Returns:
      0 when every worker succeeded, else the first failure's exit status.
    """
    os.makedirs(log_dir, exist_ok=True)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(num_workers)]}
    procs, logs = [], []
    for i in range(num_workers):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}}))
        path = os.path.join(log_dir, f"worker-{i}.log")
        logs.append(open(path, "w"))
        procs.append(subprocess.Popen(command, env=env, stdout=logs[-1],
                                      stderr=subprocess.STDOUT))
        with open(os.path.join(log_dir, f"worker-{i}.pid"), "w") as f:
            f.write(f"{procs[-1].pid}\n")
        say(f"[cluster] worker {i}{' (chief)' if i == 0 else ''}: pid {procs[-1].pid}, "
            f"{cluster['worker'][i]}, log {path}")
    chief_log = open(os.path.join(log_dir, "worker-0.log"))
    status = 0

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            for line in chief_log.readlines():
                say(line.rstrip("\n"))
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, status = failed[0]
                say(f"[cluster] worker {i} exited with status {status}; stopping the others "
                    f"(its log: {logs[i].name})")
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        status = 130
        say("[cluster] interrupted; stopping every worker")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for line in chief_log.readlines():
            say(line.rstrip("\n"))
        chief_log.close()
        for f in logs:
            f.close()
        signal.signal(signal.SIGTERM, previous)
    return status
