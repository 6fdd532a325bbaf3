"""Choosing the tf.distribute strategy.

`strategy(devices)`: one device uses the default strategy; N > 1 mirrors
across N GPUs when there are that many, otherwise across N logical devices
split from the CPU (for trying multi-device code on a laptop or in tests; it
is not faster there). Splitting the CPU must happen before TensorFlow first
touches a device, so call this first.

Left out here (the scale-out issue adds it): multi-worker training.
"""

import tensorflow as tf


def strategy(devices=1):
    if int(devices) < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if devices == 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= devices:
        return tf.distribute.MirroredStrategy([f"GPU:{i}" for i in range(devices)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.list_logical_devices("CPU")) < devices:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
        except RuntimeError as err:
            raise ValueError(f"cannot split the CPU into {devices} devices after TensorFlow "
                             f"has started: {err}") from None
    return tf.distribute.MirroredStrategy([f"CPU:{i}" for i in range(devices)])
