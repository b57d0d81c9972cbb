"""What both backends share: the tile dataclass, the dtypes and the tile math.

Tiles are named by the op's axes: ``block_c`` along C (rows of x), ``block_v`` along
the vocabulary chunk Vc (columns of w), ``block_d`` along D (the reduction of
``x @ w``). Per-row values are [block_c, 1] f32 columns (TPU wants 2-D values; Triton
takes either), and a tile ``z`` is [block_c, block_v] f32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fusedvjp.kernels import _common

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# The two kernels, as `default()` and the tuning table name them.
KERNELS = ("stats", "dlogits")


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyBlockSizes:
    """The tiles of one kernel (``row_stats`` or ``dlogits``).

    Attributes:
      block_c: rows of x per tile.
      block_v: vocabulary columns (of w) per tile.
      block_d: hidden features per step of the ``x @ w`` reduction.
      v_blocks_per_program: Triton ``row_stats`` only: vocabulary tiles one program
        walks (its running statistics stay in registers), so the launcher merges
        ``cdiv(cdiv(Vc, block_v), v_blocks_per_program)`` partial statistics per row.
        Ignored elsewhere (the TPU ``row_stats`` walks all of Vc in one grid row).
      num_warps: Triton only: warps per program, a power of two.
      num_stages: Triton only: software-pipelining depth of the D loop.

    Backend rules (checked when a kernel is built, since one value may serve either
    backend): Triton needs powers of two >= 16 whose pipelined tiles fit shared memory;
    Mosaic TPU needs ``block_c`` a multiple of 8 and ``block_v``, ``block_d`` multiples
    of 128, each unless it equals the whole dimension, and none larger than it.
    """

    block_c: int
    block_v: int
    block_d: int
    v_blocks_per_program: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _common.validate_block_fields(
            self, ("block_c", "block_v", "block_d", "v_blocks_per_program", "num_warps", "num_stages")
        )

    @classmethod
    def default(
        cls, c: int, v: int, d: int, dtype, backend: str, kernel: str = "stats"
    ) -> LinearCrossEntropyBlockSizes:
        """Tiles of ``kernel`` ("stats" or "dlogits") for x [C, D] @ w [D, Vc] in ``dtype``.

        A measured entry of the tuning table (``kernels/tuning.json``, key ``lce_<kernel>``,
        see ``_common.tuned_block_sizes``) wins; otherwise the backend's heuristic, whose
        evidence is stated beside it (a static compile report: nothing was measured on a
        device yet).
        """
        if kernel not in KERNELS:
            raise ValueError(f"unknown linear cross-entropy kernel {kernel!r}; expected one of {KERNELS}")
        tuned = _common.tuned_block_sizes(cls, f"lce_{kernel}", (c, v, d), dtype, backend)
        if tuned is not None:
            return tuned
        if backend == "triton":
            from fusedvjp.kernels.linear_softmax_cross_entropy import triton

            return triton.default_block_sizes(c, v, d, jnp.dtype(dtype), kernel)
        if backend == "mosaic_tpu":
            from fusedvjp.kernels.linear_softmax_cross_entropy import mosaic_tpu

            return mosaic_tpu.default_block_sizes(c, v, d, jnp.dtype(dtype), kernel)
        raise ValueError(f"unknown backend {backend!r}; expected one of {_common.BACKEND_NAMES}")

    def check(self, c: int, v: int, d: int, backend: str) -> None:
        """Raises ValueError if these tiles break ``backend``'s lowering rules (shared
        memory, which depends on the dtype, is checked when the Triton kernel is built)."""
        sizes = (("block_c", self.block_c, c, 8), ("block_v", self.block_v, v, 128), ("block_d", self.block_d, d, 128))
        if backend == "triton":
            bad = [f"{n}={b}" for n, b, _, _ in sizes if not _common.is_power_of_two(b) or b < 16]
            if bad:
                raise ValueError(
                    f"triton: linear cross-entropy blocks must be powers of two >= 16; got {', '.join(bad)}"
                )
        elif backend == "mosaic_tpu":
            bad = [f"{n}={b} (dimension {s})" for n, b, s, align in sizes if b != s and (b % align or b > s)]
            if bad:
                raise ValueError(
                    "mosaic_tpu: linear cross-entropy blocks must be block_c % 8 == 0 and block_v, block_d "
                    f"% 128 == 0 (or equal the whole dimension), and no larger than it; got {', '.join(bad)}"
                )
        else:
            raise ValueError(f"unknown backend {backend!r}; expected one of {_common.BACKEND_NAMES}")


def cost(x: jax.Array, w: jax.Array, kernel: str, cap: float | None) -> pl.CostEstimate:
    """What XLA's scheduler is told: the matmul's flops, one exp (and tanh) per logit, and
    the bytes of x and w read once and of dz written (the re-reads of tiles are not counted)."""
    (c, d), v = x.shape, w.shape[1]
    operands = (c * d + d * v + v) * x.dtype.itemsize
    # Per-row 4-byte values: labels in, 4 statistics out; or labels, m, log_s, g_p, g_y, g_u in.
    rows = 4 * c * (5 if kernel == "stats" else 6)
    dz = 0 if kernel == "stats" else c * v * x.dtype.itemsize
    moved = operands + rows + dz
    return pl.CostEstimate(flops=2 * c * v * d + 8 * c * v, transcendentals=c * v * (2 if cap else 1),
                           bytes_accessed=moved)


# --- shared math ------------------------------------------------------------------------


def dot_precision(dtype) -> lax.Precision:
    # IEEE f32 for f32 operands: the Pallas Triton lowering maps only HIGHEST to
    # input_precision="ieee" (DEFAULT is tf32), Mosaic TPU maps it to fp32 passes. bf16
    # products are exact in the f32 accumulator at the default precision.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def logits(acc: jax.Array, bias: jax.Array | None, cap: float | None) -> tuple[jax.Array, jax.Array | None]:
    """(z, dz/dlogit) of a tile from its f32 ``x @ w`` accumulator.

    With the soft cap z = cap tanh(l / cap) for l = x w + b, and dz/dl = 1 - tanh^2 =
    1 - (z / cap)^2, taken from the tanh itself (not from z / cap, which would add a
    rounding). Without a cap z = l and the derivative is 1 (returned as None).
    """
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    if cap is None:
        return acc, None
    a = jnp.tanh(acc * (1.0 / cap))
    return cap * a, 1.0 - a * a


def shift(m: jax.Array) -> jax.Array:
    # The exponent shift of a running max: 0 instead of -inf while nothing finite was
    # seen, so no -inf - -inf = NaN appears (the sum stays 0 there).
    return jnp.where(m == -jnp.inf, 0.0, m)


def init_stats(shape) -> tuple[jax.Array, ...]:
    """The identity of :func:`merge_stats`: (m, s, label_logit, logit_sum) = (-inf, 0, 0, 0)."""
    zeros = jnp.zeros(shape, jnp.float32)
    return jnp.full(shape, -jnp.inf, jnp.float32), zeros, zeros, zeros


def tile_stats(z, col_ok, cols, label, *, with_logit_sum: bool) -> tuple[jax.Array, ...]:
    """(m, s, label_logit, logit_sum) [block_c, 1] of one tile's valid columns.

    ``s = sum_j exp(z_j - shift(m))``; ``label_logit`` is z at the column equal to the
    row's label (0 if none; labels outside [0, Vc) are -1 by then and match none);
    ``logit_sum`` is 0 unless ``with_logit_sum``. Columns past Vc (``col_ok`` False:
    zeros or garbage) become -inf before the max and 0 before the sums.
    """
    masked = jnp.where(col_ok, z, -jnp.inf)
    m = jnp.max(masked, axis=1, keepdims=True)
    s = jnp.sum(jnp.exp(masked - shift(m)), axis=1, keepdims=True)
    label_logit = jnp.sum(jnp.where(col_ok & (cols == label), z, 0.0), axis=1, keepdims=True)
    if with_logit_sum:
        logit_sum = jnp.sum(jnp.where(col_ok, z, 0.0), axis=1, keepdims=True)
    else:
        logit_sum = jnp.zeros_like(m)
    return m, s, label_logit, logit_sum


def merge_stats(a, b) -> tuple[jax.Array, ...]:
    """Statistics of the union of two disjoint column sets (the online logsumexp step).

    With r = shift(m): sum_j exp(z_j) = exp(r) s, so over both sets, with r' the new
    shift, s' = s_a exp(r_a - r') + s_b exp(r_b - r'). Each exponent is <= 0 except for
    a side that saw nothing (m = -inf, placeholder r = 0, s = 0), where exp(-r') could
    overflow and make 0 * inf = NaN: capping the exponent at 0 keeps that term 0.
    The label logit and the logit sum add (the label lies in at most one set).
    """
    (m_a, s_a, y_a, u_a), (m_b, s_b, y_b, u_b) = a, b
    m = jnp.maximum(m_a, m_b)
    r = shift(m)
    s = s_a * jnp.exp(jnp.minimum(shift(m_a) - r, 0.0)) + s_b * jnp.exp(jnp.minimum(shift(m_b) - r, 0.0))
    return m, s, y_a + y_b, u_a + u_b


def merge_partials(m, s, label_logit, logit_sum) -> tuple[jax.Array, ...]:
    """Merges [P, C] partial statistics over P (plain jnp, after a kernel): returns
    ``row_stats``' (m, log_s, label_logit, logit_sum), [C] f32 each. Same identity
    as :func:`merge_stats`; ``m`` is returned as its shift (0 for a row of -inf)."""
    top = jnp.max(m, axis=0)
    r = shift(top)
    total = jnp.sum(s * jnp.exp(jnp.minimum(shift(m) - r, 0.0)), axis=0)
    return r, jnp.log(total), jnp.sum(label_logit, axis=0), jnp.sum(logit_sum, axis=0)


def dlogits_tile(z, dz_dl, cols, label, m, log_s, g_p, g_y, g_u) -> jax.Array:
    """d loss / d logit of a tile, f32 (the caller casts once at the store).

    For the per-row scalars loss = g_p lse - g_y z[y] - g_u sum_j z_j (whatever
    combination of them the op forms), d/dz_j = g_p p_j - g_y [j == y] - g_u with
    p_j = exp((z_j - m) - log_s); through the cap, times dz/dl = 1 - (z / cap)^2.
    """
    p = jnp.exp((z - m) - log_s)
    d = g_p * p - jnp.where(cols == label, g_y, 0.0) - g_u
    return d if dz_dl is None else d * dz_dl
