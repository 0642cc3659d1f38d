"""XLA helpers: where are we tracing, and compiling a part of the model on its own.

Some parts of the model (RoIAlign's gathers, the anchor matcher) run several
times faster as one XLA cluster even when the function around them is not
compiled (eager inference, the training step with ``--xla false``). They are
wrapped by ``jit_unless_inside_xla``, which calls the compiled function outside
XLA and the *plain* Python function while an XLA-compiled function is being
traced.

Why not always the compiled one: a ``tf.function(jit_compile=True)`` called
(and differentiated) inside another XLA-compiled function stays a function
call node in the outer graph; TF's compile-time-constant analysis then marks
every input of the call as a compile-time constant, and through it every value
it depends on: the step counter, the images' ids, ground-truth boxes, even
variables. The outer step then compiled anew each step (measured: one HLO
module of ``_replica_gradients_fn`` per step, ~12 s each, 0.07 steps/s). Inlined
as plain Python they are just ops of the outer cluster, compiled once.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

_INLINE = threading.local()


@contextlib.contextmanager
def inline_compiled_parts():
    """While active, ``jit_unless_inside_xla`` functions trace as plain ops (no nested call).

    For graphs handed to converters (ONNX, LiteRT, OpenVINO): a nested compiled
    function stays a ``PartitionedCall`` node that they cannot convert.
    """
    previous = getattr(_INLINE, "active", False)
    _INLINE.active = True
    try:
        yield
    finally:
        _INLINE.active = previous


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (``jit_compile=True``), at any depth."""
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def jit_unless_inside_xla(fn: Callable) -> Callable:
    """``fn`` XLA-compiled on its own, or inlined when the caller is already compiled.

    Returns a callable with ``fn``'s signature; its ``compiled`` attribute is the
    ``tf.function(fn, jit_compile=True, reduce_retracing=True)`` used outside XLA.
    Non-tensor arguments (ints, tuples of level names) are part of the trace key
    of ``compiled``, as with any tf.function.
    """
    compiled = tf.function(fn, jit_compile=True, reduce_retracing=True)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if in_xla_context() or getattr(_INLINE, "active", False):
            return fn(*args, **kwargs)
        return compiled(*args, **kwargs)

    call.compiled = compiled
    return call
