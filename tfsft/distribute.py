"""Where training runs: the ``tf.distribute`` strategy, the mixed-precision policy and XLA.

``distribute.strategy: auto`` picks, in order: MultiWorkerMirroredStrategy when ``TF_CONFIG`` names
more than one worker or a SLURM allocation has more than one task; TPUStrategy when a TPU is
named (``TPU_NAME``) or attached (``/dev/accel0``, a TPU VM); MirroredStrategy when more than one
GPU is visible; else the default strategy.

Keras 3's ``model.fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras #20585), so
``tfsft.loop`` trains that case with Keras' own ``train_step`` run through ``strategy.run``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tfsft.tfimport import tf
import keras

from tfsft.errors import TfsftError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from tfsft.config import DistributeConfig


class DistributeError(TfsftError):
    """The requested strategy or precision cannot be used here."""


@dataclass
class Distribution:
    """The strategy a run trains under, and what it means for this process."""

    strategy: tf.distribute.Strategy
    kind: str  # default | mirrored | multi_worker | tpu
    precision: str
    jit_compile: bool
    # The one worker that writes the run directory, checkpoints and exports.
    is_chief: bool = True
    task: str = ""  # "worker 1" in a cluster

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def describe(self) -> str:
        where = {"default": "default strategy (one device)", "mirrored": "MirroredStrategy",
                 "multi_worker": f"MultiWorkerMirroredStrategy ({self.task}"
                                 f"{', the chief' if self.is_chief else ''})", "tpu": "TPUStrategy"}[self.kind]
        return (f"distribute: {where}, {self.replicas} replica{'s' if self.replicas != 1 else ''}; "
                f"precision {self.precision}; XLA {'on' if self.jit_compile else 'off'}")


def cluster_size() -> int:
    """The number of workers TF_CONFIG (chief and workers) or a SLURM allocation names; 1 if neither."""
    tf_config = os.environ.get("TF_CONFIG")
    if tf_config:
        try:
            cluster = json.loads(tf_config).get("cluster", {})
            return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))
        except (ValueError, AttributeError):
            raise DistributeError("TF_CONFIG is not valid JSON. Fix: e.g. TF_CONFIG='{\"cluster\": "
                                  "{\"worker\": [\"host1:2222\", \"host2:2222\"]}, \"task\": "
                                  "{\"type\": \"worker\", \"index\": 0}}'") from None
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)
    return tasks if os.environ.get("SLURM_JOB_ID") else 1


def _tpu_present() -> bool:
    return bool(os.environ.get("TPU_NAME")) or os.path.exists("/dev/accel0")


def choose_strategy(setting: str) -> str:
    if setting != "auto":
        return setting
    if cluster_size() > 1:
        return "multi_worker"
    if _tpu_present():
        return "tpu"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def make_strategy(kind: str) -> tf.distribute.Strategy:
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        cpus = tf.config.list_logical_devices("CPU")
        # Without GPUs, mirror over the logical CPU devices (one unless configured otherwise).
        devices = [device.name for device in (gpus or cpus)]
        return tf.distribute.MirroredStrategy(devices=devices)
    if kind == "multi_worker":
        resolver = None
        if not os.environ.get("TF_CONFIG") and os.environ.get("SLURM_JOB_ID"):
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        elif cluster_size() < 2:
            raise DistributeError("distribute.strategy: multi_worker needs a cluster: TF_CONFIG naming "
                                  "the workers, or a SLURM allocation with several tasks. Fix: set "
                                  "TF_CONFIG on every worker, or use strategy: auto")
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    if kind == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", "local"))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as error:
            reason = first_line(error, 200)
            raise DistributeError(f"distribute.strategy: tpu: no TPU could be reached ({reason}). "
                                  f"Fix: set TPU_NAME, run on a TPU VM, or use strategy: auto") from None
        return tf.distribute.TPUStrategy(resolver)
    raise DistributeError(f"unknown strategy {kind!r}")


def _gpus_support_float16() -> bool:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return False
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        if tuple(capability) < (7, 0):
            return False
    return True


def cpu_has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 natively (AMX or AVX-512 BF16 flags)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(setting: str, kind: str) -> str:
    """``auto``: mixed_bfloat16 on TPU, mixed_float16 on GPUs with tensor cores (compute capability
    7.0 or more); on CPU, mixed_bfloat16 where the CPU has native bfloat16 (measured faster there
    for both the frozen and the fine-tuning stage, by ``benchmarks/throughput.py --precision``),
    else float32."""
    if setting != "auto":
        if setting == "mixed_float16" and not _gpus_support_float16():
            raise DistributeError("distribute.precision: mixed_float16 needs GPUs of compute "
                                  "capability 7.0 or more; none are visible. Fix: use auto, float32 "
                                  "or mixed_bfloat16")
        return setting
    if kind == "tpu":
        return "mixed_bfloat16"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16" if _gpus_support_float16() else "float32"
    return "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"


def choose_jit_compile(setting: str) -> bool:
    """``auto``: XLA on GPU and TPU, off on CPU, with or without a strategy (Keras' own ``auto``
    turns it off under every strategy)."""
    if setting != "auto":
        return setting == "true"
    return bool(tf.config.list_physical_devices("GPU")) or _tpu_present()


def setup(config: "DistributeConfig", log: Callable[[str], Any] = print) -> Distribution:
    """Creates the strategy and sets the global mixed-precision policy, before any model exists."""
    kind = choose_strategy(config.strategy)
    strategy = make_strategy(kind)
    precision = choose_precision(config.precision, kind)
    keras.mixed_precision.set_global_policy(precision)
    distribution = Distribution(strategy, kind, precision, choose_jit_compile(config.jit_compile))
    if kind == "multi_worker":
        resolver = strategy.cluster_resolver
        distribution.is_chief = bool(strategy.extended.should_checkpoint)
        distribution.task = f"{resolver.task_type} {resolver.task_id} of {cluster_size()}"
    log(distribution.describe())
    return distribution


def float32_copy(model: keras.Model) -> keras.Model:
    """The same model with every layer in float32: what is saved and exported after a
    mixed-precision run (weights are float32 under mixed precision already)."""
    if all(layer.dtype_policy.name == "float32" for layer in _all_layers(model)):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    config = _float32_config(keras.saving.serialize_keras_object(model))
    with _policy("float32"):
        copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _float32_config(value):
    if isinstance(value, dict):
        if value.get("class_name") == "DTypePolicy" and isinstance(value.get("config"), dict):
            return {**value, "config": {**value["config"], "name": "float32"}}
        return {key: _float32_config(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_float32_config(item) for item in value]
    if value in ("mixed_float16", "mixed_bfloat16"):
        return "float32"
    return value


@contextlib.contextmanager
def _policy(name: str):
    """Sets the global dtype policy inside the block."""
    saved = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(saved)
