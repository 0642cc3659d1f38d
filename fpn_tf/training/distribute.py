"""tf.distribute strategies for the training loop, chosen by name.

| name           | devices                                                      |
|----------------|--------------------------------------------------------------|
| ``one_device`` | the first GPU, else the CPU                                  |
| ``mirrored``   | ``num_gpus`` local GPUs (all if None); without GPUs, every   |
|                | logical CPU device (see ``configure_logical_cpus``)          |
| ``multi_worker`` | MultiWorkerMirroredStrategy over the cluster in TF_CONFIG  |
| ``tpu``        | TPUStrategy on ``tpu_address`` (Cloud TPU VM: "local")       |

Only the custom loop in ``fpn_tf.training.trainer`` is supported with these:
under Keras 3.15 ``model.fit`` fails with MirroredStrategy + XLA and with
MultiWorkerMirroredStrategy (keras-team/keras#20585).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("one_device", "mirrored", "multi_worker", "tpu")


def configure_logical_cpus(num_devices: int) -> None:
    """Splits the CPU into ``num_devices`` logical devices (for mirrored runs on CPU).

    Must run before TensorFlow initialises its devices (before the first op);
    afterwards TF refuses with "Virtual devices cannot be modified after being
    initialized", re-raised here with that explanation.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        )
    except RuntimeError as e:
        if len(tf.config.list_logical_devices("CPU")) == num_devices:
            return
        raise RuntimeError(
            f"cannot split the CPU into {num_devices} logical devices: TensorFlow has already "
            f"initialised its devices ({e}). Call configure_logical_cpus before any TF op."
        ) from None


def make_strategy(name: str, num_gpus: int | None = None, tpu_address: str = "") -> tf.distribute.Strategy:
    """Builds the strategy called ``name`` (one of STRATEGIES).

    Args:
        name: one_device | mirrored | multi_worker | tpu.
        num_gpus: for ``mirrored``: how many local GPUs to use (None: all).
        tpu_address: for ``tpu``: the TPU name or grpc address ("" = local).
    """
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            if num_gpus is not None:
                if num_gpus > len(gpus):
                    raise ValueError(f"num_gpus={num_gpus} but only {len(gpus)} GPU(s) are visible")
                gpus = gpus[:num_gpus]
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        if num_gpus:
            raise ValueError(f"num_gpus={num_gpus} but no GPU is visible")
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(
            [d.name for d in cpus], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    if name == "multi_worker":
        _check_tf_config()
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if tf.config.list_physical_devices("GPU")
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            )
        )
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def _check_tf_config() -> None:
    """Fails early, naming the problem, on a TF_CONFIG that cannot describe a cluster."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return  # a single worker: MultiWorkerMirroredStrategy runs locally
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError('TF_CONFIG needs "cluster" and "task" mappings')
    members = cluster.get(task.get("type"), [])
    if not isinstance(task.get("index"), int) or not 0 <= task["index"] < len(members):
        raise ValueError(f"TF_CONFIG task {task} is not in its cluster {cluster}")


def task_info(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
    """(task_type, task_id) of this process; (None, 0) outside a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the process that writes checkpoints, summaries and logs.

    That is the "chief" task, or worker 0 of a cluster without a chief, or the
    only process of a non-cluster strategy.
    """
    task_type, task_id = task_info(strategy)
    if task_type is None or task_type == "chief":
        return True
    if task_type != "worker" or task_id != 0:
        return False
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return "chief" not in cluster


def input_context(strategy: tf.distribute.Strategy) -> tf.distribute.InputContext:
    """This process's input pipeline, as ``distribute_datasets_from_function`` numbers them.

    One pipeline per worker (the chief first, then the workers in order), each
    feeding its local replicas.
    """
    local = local_replicas(strategy)
    task_type, task_id = task_info(strategy)
    pipeline_id = 0
    if task_type == "worker":
        pipeline_id = task_id + int("chief" in strategy.cluster_resolver.cluster_spec().as_dict())
    return tf.distribute.InputContext(
        num_input_pipelines=max(1, strategy.num_replicas_in_sync // local),
        input_pipeline_id=pipeline_id,
        num_replicas_in_sync=strategy.num_replicas_in_sync,
    )


def local_replicas(strategy: tf.distribute.Strategy) -> int:
    """How many replicas this process runs (1 for the default strategy)."""
    try:
        return len(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no worker_devices
        return 1
