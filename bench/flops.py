"""Floating-point operation counts of a traced TensorFlow function or a torch call.

Both count a multiply-accumulate as 2 FLOPs (the convention of TF's profiler and
of ``torch.utils.flop_counter``), so ``flops / 2`` is the usual "MACs" figure:
torchvision's fasterrcnn_resnet50_fpn is about 134 GMACs on an 800×1333 image.
"""

from __future__ import annotations


def tf_op_flops(concrete_function) -> dict[str, int]:
    """FLOPs of each op of one call of a ``tf.function``'s concrete function.

    Uses the statistics TF's profiler uses (``tf.compat.v1.profiler`` with
    ``float_operation()``): every op type with a registered "flops" statistic
    (Conv2D and its two gradients, MatMul, BatchMatMul, element-wise arithmetic,
    pooling, ...) whose shapes are static in the traced graph, so trace with fully
    defined input shapes. Ops inside loop and ``tf.map_fn`` bodies (NMS) are not
    counted: they are negligible next to the convolutions and fcs.

    Returns:
      {op name: flops} for the ops with a non-zero count.
    """
    import tensorflow as tf
    from tensorflow.python.framework import ops as tf_ops
    from tensorflow.python.profiler.internal import flops_registry  # noqa: F401 (registers the stats)
    from tensorflow.python.util import deprecation

    graph = concrete_function.graph
    counts = {}
    with deprecation.silence():  # the registry's shape helper is a deprecated v1 API
        for op in graph.get_operations():
            try:
                stats = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops")
            except (ValueError, TypeError, tf.errors.OpError):
                continue  # a dynamic shape: not countable
            if stats.value:
                counts[op.name] = int(stats.value)
    return counts


def tf_flops(concrete_function) -> int:
    """Total FLOPs of one call of a concrete function (see ``tf_op_flops``)."""
    return sum(tf_op_flops(concrete_function).values())


def torch_flops(fn) -> int:
    """FLOPs of ``fn()`` (a torch model call) counted by ``torch.utils.flop_counter``.

    Counts convolutions, matmuls and their gradients (FlopCounterMode's registry);
    element-wise ops are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())
