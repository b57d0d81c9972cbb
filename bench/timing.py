"""Timing jitted functions: compile apart, warm up, then per-call times ended by block_until_ready."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of per-call times, in seconds."""

    median: float
    p20: float
    p80: float
    n: int


def summarize(times: Sequence[float]) -> Stats:
    """Median and 20th/80th percentiles (linear interpolation) of per-call times.

    Args:
      times: seconds per call; at least one.

    Returns:
      :class:`Stats`.

    Equivalent to: ``np.percentile(times, [50, 20, 80])``.
    """
    if len(times) == 0:
        raise ValueError("no timed calls to summarize")
    p50, p20, p80 = np.percentile(np.asarray(times, np.float64), [50, 20, 80])
    return Stats(median=float(p50), p20=float(p20), p80=float(p80), n=len(times))


@dataclasses.dataclass(frozen=True)
class Compiled:
    """An ahead-of-time compiled function with its compile time and peak temporary memory."""

    fn: Callable[..., Any]
    compile_s: float
    peak_temp_bytes: int


def compile_fn(fn: Callable[..., Any], example_args: Sequence[Any],
               clock: Callable[[], float] = time.perf_counter) -> Compiled:
    """``jax.jit(fn).lower(*example_args).compile()``, timed (tracing and lowering included).

    Args:
      fn: the function to compile.
      example_args: arguments (on the device) with the shapes, dtypes and placements the
        compiled function will be called with.
      clock: seconds, monotonic.

    Returns:
      :class:`Compiled`; ``peak_temp_bytes`` is the compiled module's
      ``memory_analysis().temp_size_in_bytes``, 0 where the backend reports none.
    """
    start = clock()
    compiled = jax.jit(fn).lower(*example_args).compile()
    compile_s = clock() - start
    try:
        analysis = compiled.memory_analysis()
        temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
        temp = None
    return Compiled(compiled, compile_s, int(temp or 0))


def choose_iters(call_s: float, min_iters: int, max_iters: int, target_s: float) -> int:
    """How many timed calls: enough to fill ``target_s``, clamped to [min_iters, max_iters]."""
    if not call_s > 0 or math.isinf(call_s):
        return min_iters
    return int(min(max_iters, max(min_iters, math.ceil(target_s / call_s))))


def time_calls(
    fn: Callable[..., Any],
    inputs: Sequence[Sequence[Any]],
    *,
    warmup: int = 3,
    min_iters: int = 30,
    max_iters: int = 200,
    target_s: float = 0.3,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> list[float]:
    """Times ``fn`` call by call, cycling through ``inputs`` so none stays in cache.

    Each call is ended by ``sync`` (``block_until_ready``) before the clock is read. The
    last warm-up call's time picks the number of timed calls (:func:`choose_iters`).

    Args:
      fn: a compiled function.
      inputs: one or more argument tuples, already on the device; call ``i`` uses
        ``inputs[i % len(inputs)]``.
      warmup: untimed calls first (at least one, to estimate the call time).
      min_iters, max_iters, target_s: see :func:`choose_iters`.
      clock: seconds, monotonic (injectable for tests).
      sync: waits for a call's outputs.

    Returns:
      Seconds per timed call, in call order.
    """
    if not inputs:
        raise ValueError("time_calls needs at least one input set")
    call = 0
    estimate = math.inf
    for _ in range(max(1, warmup)):
        start = clock()
        sync(fn(*inputs[call % len(inputs)]))
        estimate = clock() - start
        call += 1
    times = []
    for _ in range(choose_iters(estimate, min_iters, max_iters, target_s)):
        args = inputs[call % len(inputs)]
        start = clock()
        sync(fn(*args))
        times.append(clock() - start)
        call += 1
    return times


def looped(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
    """``fn`` applied ``n`` times in one dispatch (a ``lax.fori_loop`` inside the jit).

    For launch-bound shapes, where one call's host dispatch outweighs its kernels: the
    looped function's time over ``n`` is what a call costs once dispatch is amortized
    (kernel time plus the gaps between kernels; the inputs stay the same every iteration).
    Each iteration passes its inputs and outputs through ``lax.optimization_barrier``, so
    the next iteration's inputs depend on this one's result: XLA can neither hoist the
    loop-invariant call out of the loop nor drop an iteration.

    Returns:
      A function of ``fn``'s arguments returning the last iteration's outputs.
    """
    from jax import lax
    import jax.numpy as jnp

    def run(*args):
        out_shape = jax.eval_shape(fn, *args)
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

        def body(_, carry):
            inputs, _ = carry
            return lax.optimization_barrier((inputs, fn(*inputs)))

        return lax.fori_loop(0, n, body, (args, init))[1]

    return run
