"""Fused softmax cross-entropy: Pallas forward and backward kernels.

Per row ``x = logits[i]`` (``V`` classes) the forward makes ONE pass over the row in
vocab blocks with an online max/sum and returns the loss and the row's logsumexp split in
two f32 numbers, ``lse = m + log_s`` with ``m = max_j x_j`` and ``log_s = log sum_j exp(x_j
- m)``; the probabilities are never written. The backward makes one pass that recomputes
``p = exp((x - m) - log_s)`` blockwise and writes ``dlogits``.

Why the split and not ``lse`` itself: ``lse`` rounded to f32 is off by up to
``2**-24 |lse|`` (6e-4 at ``|x| ~ 1e4``), and every ``p = exp(x - lse)`` inherits that as
relative error -- far worse than optax's f32 gradient, which divides ``exp(x - m)`` by
its sum. ``m`` is one of the logits, so ``x - m`` is exact (Sterbenz) for ``x`` within a
factor 2 of ``m`` and otherwise off by at most ``2**-24 (m - x)``, which moves
``p <= exp(-(m - x))`` by at most ``2**-24 / e`` absolute; ``log_s`` lies in
``[0, log V]``, so its rounding is ~1e-6 absolute. ``p`` is then as accurate as optax's.

Recompute versus saving the gradient: this design moves 2 reads + 1 write of ``[N, V]``
over forward and backward (forward reads ``x``; backward reads ``x`` and writes ``dx``).
Writing the unscaled gradient ``p - t`` as a residual in the forward costs 2 reads + 2
writes (forward reads ``x`` and writes ``p - t``; backward reads it and writes ``g * (p -
t)``, unless XLA fuses that scale into the next matmul) and keeps an ``[N, V]`` residual
alive between forward and backward -- 2 GiB at N=8192, V=128256 in bf16. The recompute
costs one extra ``exp`` per element, which is free for a memory-bound kernel. (Not
measured on a GPU yet: the argument is a byte count.)

Semantics (``a`` = label_smoothing, ``s`` = z_loss, ``y`` = integer label):
  * integer labels: ``t = (1 - a) * onehot(y) + a / V``;
    ``loss = lse - (1 - a) * x[y] - (a / V) * sum_j x_j + s * lse**2``.
    ``y`` outside ``[0, V)``: loss NaN and gradient row NaN.
  * probability labels ``t [N, V]``: ``loss = lse * sum_j t_j - sum_j t_j * x_j``, where a
    term with ``t_j == 0`` is 0 even if ``x_j = -inf`` (the xlogy convention).
  * ``where[i] == False``: loss 0 and gradient row 0, whatever the row holds.
  * ``-inf`` logits (masked vocabulary): ``p = 0`` there and the gradient is ``-g * t``
    (0 where the target is 0); the loss stays finite unless the target puts mass on a
    ``-inf`` logit (then it is ``+inf``, as it should be: e.g. ``a > 0``).
  * a row whose logits are all ``-inf``: ``lse = -inf``, loss NaN, gradient row NaN.

Vocabulary sharding (``vocab_shard=True`` forward, ``num_classes`` / ``check_labels`` in
the backward): device ``k`` holds columns ``[off_k, off_k + V_k)`` and labels ``y - off_k``.
Its forward returns row statistics that add up over devices:
``lse = M + log sum_k exp(row_max_k + log_sum_k - M)`` with ``M = max_k row_max_k``,
``x[y] = sum_k label_logit_k`` (0 on every device but the label's), ``sum_j x_j = sum_k
logit_sum_k``; for probability labels ``sum(t) = sum_k label_sum_k`` and ``sum(t x) =
sum_k label_dot_k``. The backward on each device is the unsharded one given the global
``(M, log S)`` (and global ``sum(t)``), with ``a / V`` over the global ``V``; the
combining code, which sees the global label, makes invalid rows NaN through ``g``.

One file per backend: ``triton.py`` and ``mosaic_tpu.py``, each with its kernels,
launchers and tile rules; ``common.py`` holds the tile dataclass
(``CrossEntropyBlockSizes``) and the block math both kernels run (online logsumexp,
per-label-kind accumulation, the gradient tile).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

from fusedvjp.kernels import _common
from fusedvjp.kernels.softmax_cross_entropy import mosaic_tpu, triton
from fusedvjp.kernels.softmax_cross_entropy.common import DTYPES, CrossEntropyBlockSizes

__all__ = ["CrossEntropyBlockSizes", "softmax_cross_entropy_bwd", "softmax_cross_entropy_fwd"]

_OP_NAME = "softmax_cross_entropy"
# Backend name -> its module (fwd and bwd with one signature each).
_BACKENDS = {"triton": triton, "mosaic_tpu": mosaic_tpu}


def _check_args(logits, labels, where, label_smoothing, z_loss) -> bool:
    """Validates shapes and options; returns whether labels are probabilities.

    ``label_smoothing`` in [0, 1) and ``z_loss`` in [0, inf) are validated once, by the
    public ops (``ops.softmax_cross_entropy``); here they are preconditions."""
    assert 0.0 <= label_smoothing < 1.0 and 0.0 <= z_loss < math.inf, (label_smoothing, z_loss)
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, V] with N, V >= 1, got shape {logits.shape}")
    n, v = logits.shape
    if jnp.dtype(logits.dtype) not in DTYPES:
        raise NotImplementedError(f"logits dtype {logits.dtype} (the kernels take float32 or bfloat16)")
    if where.shape != (n,):
        raise ValueError(f"where must be [N]={n,}, got shape {where.shape}")
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape == (n,):
        return False
    if jnp.issubdtype(labels.dtype, jnp.floating) and labels.shape == (n, v):
        if label_smoothing or z_loss:
            raise ValueError(
                f"label_smoothing={label_smoothing} and z_loss={z_loss} must be 0 with probability labels"
            )
        return True
    raise ValueError(
        f"labels must be integer [N]={n,} or floating [N, V]={n, v}, got {labels.dtype} {labels.shape}"
    )


def _check_flag(name: str, value) -> None:
    # Static options pick kernel variants at trace time: a traced or array value is an error.
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r:.80} must be a Python bool")


def _num_classes(num_classes, v: int) -> int:
    """``num_classes`` validated (an int >= the local V), or the local V if None."""
    if num_classes is None:
        return v
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < v:
        raise ValueError(f"num_classes={num_classes!r:.80} must be an int >= the local V={v}")
    return int(num_classes)


def _kernel_labels(labels: jax.Array, prob_labels: bool, v: int) -> jax.Array:
    """Labels as the kernels read them: int32 class indices (-1 for a label outside
    ``[0, V)``, checked before any narrowing: ``_common.class_indices``), or probabilities
    of >= 2 bytes.

    A label of another shard (``vocab_shard``), ``y >= V_local``, would otherwise match a
    column of the tail block past the array (x = -inf there) and make label_logit -inf;
    -1 matches none. 1-byte probabilities (float8) are widened to bf16, which holds every float8 value
    exactly. The Pallas Triton lowering switches element offsets to 64 bits only for
    arrays over 2**32 *bytes*; a 1-byte [N, V] array of 2**31..2**32 elements would get
    32-bit offsets and wrap (tests/test_offsets.py guards this).
    """
    if not prob_labels:
        return _common.class_indices(labels, v)
    return labels.astype(jnp.bfloat16) if jnp.dtype(labels.dtype).itemsize == 1 else labels


def softmax_cross_entropy_fwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    vocab_shard: bool = False,
    backend: str | None = None,
    block_sizes: CrossEntropyBlockSizes | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]] | tuple[jax.Array, ...]:
    """Per-row softmax cross-entropy and its logsumexp residual, in one pass over the logits.

    Equivalent to (integer labels; probability labels use ``t = labels`` directly)::

      x = logits.astype(f32)
      row_max = jnp.max(x, axis=-1)  # 0 instead where a row is all -inf
      log_sum = jnp.log(jnp.sum(jnp.exp(x - row_max[:, None]), axis=-1))
      lse = row_max + log_sum
      t = (1 - label_smoothing) * jax.nn.one_hot(labels, V) + label_smoothing / V
      loss = lse * t.sum(-1) - (t * logits).sum(-1) + z_loss * lse**2
      loss = jnp.where(where, loss, 0.0)

    and with ``vocab_shard`` (``V`` is the local ``V_local``; for probability labels the
    last two are ``t.sum(-1)`` and ``(t * x).sum(-1)`` with 0 where ``t == 0``)::

      label_logit = jnp.sum(jnp.where(jnp.arange(V) == labels[:, None], x, 0.0), axis=-1)
      logit_sum = x.sum(-1) if label_smoothing > 0 else jnp.zeros(N)
      stats = (row_max, log_sum, jnp.where(where, label_logit, 0.0), jnp.where(where, logit_sum, 0.0))

    Args:
      logits: [N, V] float32 or bfloat16.
      labels: integer [N] class indices (any integer dtype, range-checked before the
        int32 cast), or floating [N, V] target probabilities (then
        ``label_smoothing`` and ``z_loss`` must be 0). An index outside [0, V) gives a NaN
        loss (without ``vocab_shard``).
      where: bool [N]; rows that are False get loss 0.
      label_smoothing: ``a`` in [0, 1) (integer labels). With ``vocab_shard`` only
        ``a > 0`` versus ``a == 0`` matters: it says whether ``logit_sum`` is computed.
      z_loss: weight of ``lse**2``, >= 0 and finite (integer labels). With
        ``vocab_shard`` it has no effect: no local statistic depends on it.
      vocab_shard: ``logits`` is one device's slice ``[N, V_local]`` of a vocabulary split
        over devices, and integer labels are local (``y - offset``; a label outside
        ``[0, V_local)`` lies on another device and is not an error). Returns the local
        row statistics below instead of the loss; the caller combines them over devices
        (see the module docstring) and applies ``label_smoothing`` and ``z_loss`` there,
        with the global ``V``. Static.
      backend: ``"triton"``, ``"mosaic_tpu"`` or None (per platform; see
        ``_common.platform_dispatch``).
      block_sizes: None for the per-backend default, or a tile that must suit ``backend``
        (every backend when ``backend`` is None).

    Returns:
      ``(loss, (row_max, log_sum))`` -- for probability labels ``(loss, (row_max, log_sum,
      label_sum))`` -- all [N] float32; ``row_max + log_sum`` is the row's logsumexp
      (``row_max`` is 0 on a row that is all -inf, ``log_sum`` -inf there), and
      ``label_sum = sum_j t_j``, which the backward's ``p * sum(t)`` needs and the forward
      has already summed (4N bytes, instead of a second read of the [N, V] labels).
      ``(row_max, log_sum)`` is the residual for the backward: with it
      ``p = exp((x - row_max) - log_sum)`` is recomputed blockwise without a second
      reduction pass. It is the logsumexp in two parts, not one f32 ``lse`` (why: the
      module docstring). Two [N] arrays rather than one
      [N, 2]: each is a plain per-row block in both backends ([N] for Triton, [N, 1]
      for TPU), so neither kernel interleaves or slices columns.

      With ``vocab_shard``: a flat tuple of four [N] float32 arrays over the local
      columns, from the same single pass. Integer labels: ``(row_max, log_sum,
      label_logit, logit_sum)`` with ``label_logit = x[y]`` if ``0 <= y < V_local`` else
      0, and ``logit_sum = sum_j x_j`` if ``label_smoothing > 0`` else 0 (then not
      accumulated: the loss does not need it, and a 0 keeps ``0 * logit_sum`` from being
      NaN at ``-inf`` logits). Probability labels: ``(row_max, log_sum, label_sum,
      label_dot)`` with ``label_sum = sum_j t_j`` and ``label_dot = sum_j t_j x_j`` (a
      term with ``t_j == 0`` is 0, even at ``x_j = -inf``). ``(row_max, log_sum)`` are
      this slice's residual exactly as without ``vocab_shard``, on every row, ``where``
      or not (``(0, -inf)`` on a row whose slice is all ``-inf``: it adds ``exp(-inf) =
      0`` to the combined sum); the last two are 0 on rows with ``where`` False.
      ``logit_sum`` and ``label_dot`` are un-based from the shift-relative accumulators
      (``V_local * row_max - sum_j (row_max - x_j)``), so they carry the f32 rounding of
      numbers of size ``V_local |x|``. The combining code should form ``lse - x[y]`` as
      ``(M - label_logit) + log S``, which does not cancel at ``|x| ~ 1e4``.

    Raises:
      ValueError: bad shapes, options or block sizes.
      NotImplementedError: a logits dtype the kernels do not take.
    """
    prob_labels = _check_args(logits, labels, where, label_smoothing, z_loss)
    _check_flag("vocab_shard", vocab_shard)
    n, v = logits.shape
    _common.check_block_sizes(block_sizes, CrossEntropyBlockSizes, backend, n, v)
    options = dict(
        block_sizes=block_sizes,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        vocab_shard=vocab_shard,
    )
    impls = {name: functools.partial(module.fwd, **options) for name, module in _BACKENDS.items()}
    labels = _kernel_labels(labels, prob_labels, v)
    return _common.platform_dispatch(
        impls, logits, labels, where.astype(jnp.int32), backend=backend, op_name=_OP_NAME
    )


def softmax_cross_entropy_bwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array,
    residual: tuple[jax.Array, ...],
    g: jax.Array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    num_classes: int | None = None,
    check_labels: bool = True,
    backend: str | None = None,
    block_sizes: CrossEntropyBlockSizes | None = None,
) -> jax.Array:
    """Gradient of :func:`softmax_cross_entropy_fwd`'s loss with respect to the logits.

    Equivalent to (``t`` as in the forward, over the local columns: for integer labels
    ``(1 - a) * one_hot(labels, V_local) + a / num_classes``)::

      row_max, log_sum = residual[:2]
      sum_t = residual[2] if probability labels else 1.0  # sum(t) over the whole vocabulary
      p = jnp.exp((logits.astype(f32) - row_max[:, None]) - log_sum[:, None])
      d = p * (sum_t + 2 * z_loss * (row_max + log_sum))[:, None] - t
      d = jnp.where(check_labels & ~((labels >= 0) & (labels < V_local))[:, None], jnp.nan, d)
      dlogits = jnp.where(where[:, None], g[:, None] * d, 0.0).astype(logits.dtype)

    Args:
      logits, labels, where, label_smoothing, z_loss, backend, block_sizes: as passed
        to the forward.
      residual: the forward's residual: ``(row_max, log_sum)`` (``, label_sum`` for
        probability labels), [N] float32 each. Under vocabulary sharding, the global
        ones combined over devices: ``(M, log S)`` (``, sum_k label_sum_k``).
      g: [N] float32, the cotangent of the loss.
      num_classes: the ``V`` of the smoothing term ``a / V``; None for ``logits.shape[1]``.
        Under vocabulary sharding, the global V (>= the local V, else ValueError). No
        effect for probability labels (no smoothing). Static.
      check_labels: True: an integer label outside ``[0, V_local)`` makes its row NaN.
        False: such a label matches no column and the row is ``g * (p (1 + 2 z lse) -
        a / num_classes)`` -- under sharding the label lies on another device, and the
        combining code makes globally invalid rows NaN itself (with ``g = NaN``). No
        effect for probability labels. Static.

    Returns:
      dlogits [N, V] in ``logits.dtype``. Rows with ``where`` False are 0; rows whose
      integer label is outside [0, V) (with ``check_labels``), or whose logits are all
      -inf, are NaN.

    Raises:
      ValueError: bad shapes, options or block sizes.
      NotImplementedError: a logits dtype the kernels do not take.
    """
    prob_labels = _check_args(logits, labels, where, label_smoothing, z_loss)
    _check_flag("check_labels", check_labels)
    n, v = logits.shape
    num_classes = _num_classes(num_classes, v)
    names = ("row_max", "log_sum", "label_sum") if prob_labels else ("row_max", "log_sum")
    if not (isinstance(residual, (tuple, list)) and len(residual) == len(names)):
        raise ValueError(f"residual must be the forward's ({', '.join(names)}), got {residual!r:.80}")
    for name, a in (*zip(names, residual), ("g", g)):
        if a.shape != (n,):
            raise ValueError(f"{name} must be [N]={n,}, got shape {a.shape}")
    _common.check_block_sizes(block_sizes, CrossEntropyBlockSizes, backend, n, v)
    labels = _kernel_labels(labels, prob_labels, v)
    options = dict(
        block_sizes=block_sizes,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
    )
    impls = {name: functools.partial(module.bwd, **options) for name, module in _BACKENDS.items()}
    return _common.platform_dispatch(
        impls,
        logits,
        labels,
        where.astype(jnp.int32),
        *(r.astype(jnp.float32) for r in residual[:2]),
        g.astype(jnp.float32),
        # Probability labels: sum(t) per row, saved by the forward (4N bytes) rather than
        # re-summed from the [N, V] labels here (an extra read of them).
        *(r.astype(jnp.float32) for r in residual[2:]),
        backend=backend,
        op_name=_OP_NAME,
    )
