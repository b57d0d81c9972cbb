"""Ceilings measured in the same run (copy bandwidth, bf16 and f32 matmul rates) and each row's place under them."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fusedvjp.bench import timing

# Sizes per platform kind: (copy bytes, matmul n). 1 GiB copies and 8192^3 matmuls fill
# an H100; on CPU they would only take long, and CPU numbers mean nothing for speed.
SIZES = {"accelerator": (2**30, 8192), "cpu": (64 * 2**20, 1024), "quick": (8 * 2**20, 256)}


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Measured ceilings: copy bandwidth (bytes read + written per second) and matmul rates."""

    hbm_gbps: float
    bf16_tflops: float
    f32_tflops: float

    def peak_tflops(self, dtype: str) -> float:
        return self.bf16_tflops if dtype == "bf16" else self.f32_tflops


def _median_s(fn, args, quick: bool) -> float:
    compiled = timing.compile_fn(fn, args).fn
    n = 5 if quick else 30
    return timing.summarize(timing.time_calls(compiled, [args], warmup=2, min_iters=n, max_iters=n)).median


def measure(platform: str, quick: bool = False) -> Roofline:
    """Measures the ceilings on the default device.

    Copy: ``x + 1`` over a large f32 array, counting bytes read plus written. Matmul:
    ``jnp.dot`` of two random n x n matrices, bf16 (f32 accumulation) and f32 at
    ``Precision.HIGHEST`` (IEEE f32, like every f32 matmul of the benchmark).

    Args:
      platform: ``"gpu"``, ``"tpu"`` or ``"cpu"``.
      quick: small sizes and few calls (for CPU smoke runs).

    Returns:
      :class:`Roofline`.
    """
    copy_bytes, n = SIZES["quick" if quick else ("cpu" if platform == "cpu" else "accelerator")]
    key_x, key_a, key_b = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (copy_bytes // 4,), jnp.float32)
    copy_s = _median_s(lambda v: v + 1.0, (x,), quick)
    del x
    rates = {}
    for name, dtype, precision in (("bf16", jnp.bfloat16, None), ("f32", jnp.float32, jax.lax.Precision.HIGHEST)):
        a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
        matmul = functools.partial(jnp.dot, precision=precision, preferred_element_type=jnp.float32)
        rates[name] = 2 * n**3 / _median_s(lambda p, q: matmul(p, q).astype(dtype), (a, b), quick) / 1e12
    return Roofline(hbm_gbps=2 * copy_bytes / copy_s / 1e9, bf16_tflops=rates["bf16"], f32_tflops=rates["f32"])


def row_metrics(nbytes: int, flops: int, dtype: str, median_s: float, roof: Roofline) -> dict:
    """Achieved throughput and the fraction of the binding ceiling.

    The roofline time is ``max(bytes / bandwidth, flops / peak)`` (the binding ceiling);
    ``pct_of_roofline = 100 * roofline_time / median``.

    Args:
      nbytes: minimal bytes moved.
      flops: floating-point operations.
      dtype: ``"f32"`` or ``"bf16"`` (selects the matmul peak).
      median_s: measured median seconds per call.
      roof: the measured ceilings.

    Returns:
      ``{"gbps", "tflops", "roofline_ms", "bound", "pct_of_roofline"}``.
    """
    memory_s = nbytes / (roof.hbm_gbps * 1e9)
    compute_s = flops / (roof.peak_tflops(dtype) * 1e12)
    roofline_s = max(memory_s, compute_s)
    return {
        "gbps": nbytes / median_s / 1e9,
        "tflops": flops / median_s / 1e12,
        "roofline_ms": roofline_s * 1e3,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "pct_of_roofline": 100.0 * roofline_s / median_s,
    }
