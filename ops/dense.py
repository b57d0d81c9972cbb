"""Fully connected layer with an optional activation: ``act(x @ w + b)``, with a hand-written VJP.

The VJP, derived the way the project's seed does it (write the Jacobian, see its
structure, never materialize it). With ``z = x W + b`` and ``a = act(z)`` for one row:

* ``da/dz`` is diagonal: ``1 - a**2`` for tanh (``tanh' = 1 - tanh**2``), 1 for identity,
  and for gelu (tanh approximation, ``0.5 z (1 + tanh u)``, ``u = c (z + 0.044715 z**3)``,
  ``c = sqrt(2/pi)``) ``0.5 (1 + tanh u) + 0.5 z (1 - tanh**2 u) c (1 + 3 * 0.044715 z**2)``;
  exact gelu ``z Phi(z)`` has ``Phi(z) + z phi(z)``. So ``dz = g * act'(z)``: an
  elementwise product, not a matrix.
* ``dz/dx`` is ``W^T``, so ``dx = dz W^T``.
* ``dz/dW`` is the Kronecker-structured ``x (x) I``: contracting it with ``dz`` gives the
  outer product ``x^T dz``, summed over the batch rows -- ``dW = X^T dZ``.
* ``dz/db`` is the identity per row, so ``db = sum_rows dZ``.

For tanh the residual is the activation ``a`` (not ``z``): tanh's derivative is a
function of its output, and ``a`` is the tensor the forward writes anyway -- no extra
memory. gelu's derivative is not a function of its output (gelu is not monotonic: two
``z`` below 0 share each ``a`` in (-0.17, 0) and their slopes differ), so for gelu the
residual is ``z``, written by the forward kernel as a second output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fusedvjp.ops import _sharding
from fusedvjp.ops._dispatch import check_float, compute_dtype, resolve_impl, reverse_mode_only, run_kernel

# None, tanh, gelu (tanh approximation: jax.nn.gelu(approximate=True)), gelu_exact (erf:
# jax.nn.gelu(approximate=False)). The kernels' list (kernels/dense/common.py) is the same.
ACTIVATIONS = (None, "tanh", "gelu", "gelu_exact")


def _is_16_bit(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 2


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at the precision its dtype gets on every path, the kernels included.

    16-bit operands: one pass at default precision with f32 accumulation (tensor cores),
    the result in the operands' dtype -- what ``x @ w`` in user code does, so that XLA's
    autodiff of the reference (the benchmark's baseline) runs its backward matmuls on
    16-bit operands too, with the cotangent ``dz`` rounded once, as the kernels round it.
    f32 (f64 in x64 mode): IEEE at ``Precision.HIGHEST``. The default f32 dot is TF32 in
    XLA on GPU and in the Pallas Triton lowering (which maps only HIGHEST to "ieee"), and
    single-pass bf16 on TPU; HIGHEST everywhere keeps the paths comparable.
    """
    out_sharding = _explicit_out_sharding(a, b)
    if _is_16_bit(a.dtype):
        # No preferred_element_type: with an f32 result type, autodiff would transpose this
        # dot into f32 x f32 matmuls. XLA accumulates a bf16 dot in f32 (cuBLAS, the TPU
        # MXU, the CPU emitter) and rounds the result once.
        return jnp.matmul(a, b, out_sharding=out_sharding)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=a.dtype,
                      out_sharding=out_sharding)


def _explicit_out_sharding(a: jax.Array, b: jax.Array):
    """Under explicit mesh axes, ``a @ b``'s sharding: ``a``'s rows and ``b``'s columns
    (the columns left whole if their axes already split the rows).

    JAX asks for it when the contracted axis is split (row-parallel ``w``): the partial
    products are then all-reduced. None without explicit axes (JAX infers it). The mesh
    is the set one or, with none set, the one in the operands' types.
    """
    mesh = _sharding.explicit_mesh(a, b)
    if mesh is None:
        return None

    def entries(x):
        spec = tuple(jax.typeof(x).sharding.spec)
        return spec + (None,) * (x.ndim - len(spec))

    def axes(entry):
        return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))

    rows, col = entries(a)[:-1], entries(b)[-1]
    if set(axes(col)) & {ax for r in rows for ax in axes(r)}:
        col = None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*rows, col))


def _activate(z: jax.Array, activation: str | None) -> jax.Array:
    if activation == "tanh":
        return jnp.tanh(z)
    if activation in ("gelu", "gelu_exact"):
        return jax.nn.gelu(z, approximate=activation == "gelu")
    return z


def _saves_preactivation(activation: str | None) -> bool:
    from fusedvjp.kernels.dense import common

    return common.saves_preactivation(activation)


def dense_reference(x, w, b=None, *, activation=None):
    """The ``impl="xla"`` path: plain jnp, differentiated by JAX's autodiff.

    Equivalent to: ``act(x @ w + b)`` with the bias and activation in f32 (f64 for f64
    inputs), cast to ``x.dtype``; the matmul as in :func:`_matmul`.
    """
    return _reference_and_z(x, w, b, activation=activation)[0]


def _reference_and_z(x, w, b, *, activation):
    """(a, z) in x's dtype: the reference and its pre-activation, gelu's residual."""
    z = _matmul(x, w).astype(compute_dtype(x.dtype))
    if b is not None:
        z = z + b.astype(z.dtype)
    return _activate(z, activation).astype(x.dtype), z.astype(x.dtype)


# --- custom_vjp: primal and forward rule share _dense_forward ----------------------------


def _forward_layout(has_bias: bool, activation: str | None, write_z: bool) -> _sharding.Layout:
    """``z = x w + b`` over factors m (rows), k (contracted), n (columns).

    Rows split (data parallel) and columns split (``w`` column-parallel) need nothing:
    each device computes its own block of ``a`` (and of ``z`` with ``write_z``). A split
    ``k`` (``w`` row-parallel, ``x`` split the same way) makes each device's ``x w`` a
    partial sum: it is all-reduced before the bias and activation, which are not linear
    -- so the op reduces, not the caller.
    """
    return _sharding.Layout(("m k", "k n", "n") if has_bias else ("m k", "k n"),
                            ("m n", "m n") if write_z else ("m n",),
                            local=functools.partial(_forward_local, activation=activation, write_z=write_z))


def _forward_local(assign, fn, is_kernel, *, activation, write_z):
    if "k" not in assign:
        return fn
    from fusedvjp.kernels import dense as kernels

    def local(x, w, b=None):
        # The partial products are rounded to x's dtype and summed in it, as XLA's
        # partitioning of the reference's ``x @ w`` does for a split contraction.
        partial = kernels.dense_fwd(x, w, None, activation=None) if is_kernel else _matmul(x, w)
        z = _sharding.psum_over(partial, assign, ("k",)).astype(compute_dtype(x.dtype))
        if b is not None:
            z = z + b.astype(z.dtype)
        a = _activate(z, activation).astype(x.dtype)
        return (a, z.astype(x.dtype)) if write_z else a

    return local


def _dense_forward(x, w, b, activation, impl, return_residuals):
    from fusedvjp.kernels import dense as kernels

    write_z = return_residuals and _saves_preactivation(activation)
    out = run_kernel(
        impl,
        functools.partial(kernels.dense_fwd, activation=activation, return_residual=write_z),
        functools.partial(_reference_and_z if write_z else dense_reference, activation=activation),
        (x, w, b),
        "dense",
        _forward_layout(b is not None, activation, write_z),
    )
    a, z = out if write_z else (out, None)
    if return_residuals:
        # x and w for the two matmuls of the backward; the activation's residual (a for
        # tanh, whose derivative is a function of a; z for gelu, whose is not); b only
        # for its type (a cotangent must come back typed like its input).
        return a, (x, w, a if z is None else z, b)
    return a


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense(x, w, b, activation, impl):
    return _dense_forward(x, w, b, activation, impl, return_residuals=False)


def _dense_fwd_rule(x, w, b, activation, impl):
    return _dense_forward(x, w, b, activation, impl, return_residuals=True)


def _backward_layout(has_bias: bool) -> _sharding.Layout:
    """dx = dz w^T sums over n; dW = x^T dz and db = sum_m dz sum over m. So rows split
    (data parallel) all-reduce dW and db, columns split (column-parallel w) all-reduce
    dx, and a split k needs nothing (db, which does not depend on k, comes out the same
    on every device)."""
    if has_bias:
        return _sharding.Layout(("m k", "k n", "m n", "m n"), ("m k", "k n", "n"), sums=("n", "m", "m"))
    return _sharding.Layout(("m k", "k n", "m n", "m n"), ("m k", "k n"), sums=("n", "m"))


def _dense_bwd_rule(activation, impl, residuals, g):
    from fusedvjp.kernels import dense as kernels

    x, w, r, b = residuals
    options = dict(has_bias=b is not None, activation=activation)
    dx, dw, db = run_kernel(
        impl,
        functools.partial(kernels.dense_bwd, **options),
        functools.partial(_dense_bwd_jnp, **options),
        (x, w, r, g),
        "dense",
        _backward_layout(b is not None),
    )
    return _sharding.match_cotangent(dx, x), _sharding.match_cotangent(dw, w), _sharding.match_cotangent(db, b)


def _dense_bwd_jnp(x, w, r, g, *, has_bias, activation):
    dz = g.astype(compute_dtype(x.dtype))
    if activation is not None:
        from fusedvjp.kernels.dense import common

        # act'(z) from the residual r (a for tanh: 1 - a**2; z for gelu), in dz's dtype.
        dz = dz * common.derivative(r.astype(dz.dtype), activation)
    # dz is rounded to the operand dtype once, as the kernels do, before both matmuls.
    dz_operand = dz.astype(x.dtype)
    dx = _matmul(dz_operand, w.T).astype(x.dtype)
    dw = _matmul(x.T, dz_operand).astype(w.dtype)
    db = jnp.sum(dz, axis=0).astype(w.dtype) if has_bias else None
    return dx, dw, db


_dense.defvjp(_dense_fwd_rule, _dense_bwd_rule)


# --- public API ----------------------------------------------------------------------------


def _check(x, w, b, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    check_float("x", x)
    check_float("w", w)
    if x.ndim < 1:
        raise ValueError(f"x must have rank >= 1 ([..., K]), got shape {x.shape}")
    if w.ndim != 2:
        raise ValueError(f"w must have rank 2 ([K, N]), got shape {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x's last dim K={x.shape[-1]} does not match w's first dim {w.shape[0]} "
                         f"(x {x.shape}, w {w.shape})")
    if b is not None:
        check_float("b", b)
        if b.shape != (w.shape[1],):
            raise ValueError(f"b must have shape (N,) = ({w.shape[1]},) to match w {w.shape}, got {b.shape}")


def dense(x, w, b=None, *, activation=None, impl="auto"):
    """Fully connected layer ``act(x @ w + b)`` with a hand-written backward pass.

    Args:
      x: ``[..., K]`` floating input.
      w: ``[K, N]`` weights (Flax kernel layout). Cast to ``x.dtype``.
      b: ``[N]`` bias or None. Cast to ``x.dtype``.
      activation: ``None``, ``"tanh"``, ``"gelu"`` (tanh approximation, as
        ``jax.nn.gelu(approximate=True)``) or ``"gelu_exact"`` (erf, as
        ``jax.nn.gelu(approximate=False)``), applied to the f32 accumulator. For the gelus
        the forward also writes ``z = x @ w + b`` (in ``x.dtype``) as the backward's
        residual when differentiated; Triton cannot lower erf, so ``"gelu_exact"`` on a
        GPU runs the Mosaic GPU kernels (Hopper, bf16) or falls back to jnp.
      impl: ``"auto"`` (pallas on GPU/TPU, jnp on CPU), ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      ``[..., N]`` in ``x.dtype``. f32 inputs: IEEE f32 matmul (``Precision.HIGHEST``);
      bf16: bf16 operands, f32 accumulation, in both directions; f64 (x64 mode): f64 on
      the xla and jnp paths (the kernels refuse f64, so ``"auto"`` falls back to jnp).

    Raises:
      ValueError / TypeError: mismatched K, wrong ranks, non-float inputs, unknown
        ``impl`` or ``activation``.

    Equivalent to: ``act(x @ w + b)`` with the bias and activation in f32, cast to ``x.dtype``.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    b = None if b is None else jnp.asarray(b)
    _check(x, w, b, activation)
    impl = resolve_impl(impl)
    # Mixed precision as in Flax: the parameters are cast to the activation dtype
    # (outside the custom_vjp, so autodiff returns their cotangents in their own dtype).
    w = w.astype(x.dtype)
    b = None if b is None else b.astype(x.dtype)
    if impl == "xla":
        return dense_reference(x, w, b, activation=activation)
    batch_shape = x.shape[:-1]
    x2 = x.reshape(math.prod(batch_shape), x.shape[-1])
    with reverse_mode_only("dense_tanh" if activation == "tanh" else "dense", impl):
        a = _dense(x2, w, b, activation, impl)
    return a.reshape(*batch_shape, w.shape[1])


def dense_tanh(x, w, b=None, *, impl="auto"):
    """``tanh(x @ w + b)`` with a hand-written backward pass; see :func:`dense`.

    Equivalent to: ``dense(x, w, b, activation="tanh", impl=impl)``.
    """
    return dense(x, w, b, activation="tanh", impl=impl)
