"""Fully connected layer with an optional tanh: ``act(x @ w + b)``, with a hand-written VJP.

The VJP, derived the way the project's seed does it (write the Jacobian, see its
structure, never materialize it). With ``z = x W + b`` and ``a = act(z)`` for one row:

* ``da/dz`` is diagonal: ``1 - a**2`` for tanh (``tanh' = 1 - tanh**2``), 1 for identity.
  So ``dz = g * (1 - a**2)``: an elementwise product, not a matrix.
* ``dz/dx`` is ``W^T``, so ``dx = dz W^T``.
* ``dz/dW`` is the Kronecker-structured ``x (x) I``: contracting it with ``dz`` gives the
  outer product ``x^T dz``, summed over the batch rows -- ``dW = X^T dZ``.
* ``dz/db`` is the identity per row, so ``db = sum_rows dZ``.

The residual is the activation ``a`` (not ``z``): tanh's derivative is a function of
its output, and ``a`` is the tensor the forward writes anyway -- no extra memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fusedvjp.ops._dispatch import check_float, resolve_impl, run_kernel, uses_kernels

ACTIVATIONS = (None, "tanh")
# f32 matmuls run at IEEE f32 precision on every path. The default f32 dot is TF32 both
# in XLA on GPU and in the Pallas Triton lowering (which maps only HIGHEST to "ieee"), and
# single-pass bf16 on TPU; pinning HIGHEST everywhere keeps the reference, the jnp path and
# the kernels comparable, and the benchmark like with like.
PRECISION = jax.lax.Precision.HIGHEST


def _activate(z: jax.Array, activation: str | None) -> jax.Array:
    return jnp.tanh(z) if activation == "tanh" else z


def dense_reference(x, w, b=None, *, activation=None):
    """The ``impl="xla"`` path: plain jnp, differentiated by JAX's autodiff.

    Equivalent to: ``act(x @ w + b).astype(x.dtype)`` with f32 accumulation.
    """
    z = jnp.matmul(x, w, precision=PRECISION, preferred_element_type=jnp.float32)
    if b is not None:
        z = z + b.astype(jnp.float32)
    return _activate(z, activation).astype(x.dtype)


# --- custom_vjp: primal and forward rule share _dense_forward ----------------------------


def _dense_forward(x, w, b, activation, impl, return_residuals):
    def jnp_path():
        return dense_reference(x, w, b, activation=activation)

    if uses_kernels(impl):
        from fusedvjp.kernels import dense as kernels

        a = run_kernel(impl, lambda: kernels.dense_fwd(x, w, b, activation=activation), jnp_path, "dense")
    else:
        a = jnp_path()
    if return_residuals:
        # x and w for the two matmuls of the backward; a for tanh's derivative.
        return a, (x, w, a, b is not None)
    return a


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense(x, w, b, activation, impl):
    return _dense_forward(x, w, b, activation, impl, return_residuals=False)


def _dense_fwd_rule(x, w, b, activation, impl):
    return _dense_forward(x, w, b, activation, impl, return_residuals=True)


def _dense_bwd_rule(activation, impl, residuals, g):
    x, w, a, has_bias = residuals
    jnp_path = functools.partial(_dense_bwd_jnp, x, w, a, g, has_bias, activation)
    if uses_kernels(impl):
        from fusedvjp.kernels import dense as kernels

        kernel = functools.partial(kernels.dense_bwd, x, w, a, g, has_bias=has_bias, activation=activation)
        return run_kernel(impl, kernel, jnp_path, "dense")
    return jnp_path()


def _dense_bwd_jnp(x, w, a, g, has_bias, activation):
    a32 = a.astype(jnp.float32)
    dz = g.astype(jnp.float32)
    if activation == "tanh":
        dz = dz * (1.0 - a32 * a32)  # tanh'(z) = 1 - tanh(z)**2 = 1 - a**2
    dx = jnp.matmul(dz, w.T.astype(jnp.float32), precision=PRECISION).astype(x.dtype)
    dw = jnp.matmul(x.T.astype(jnp.float32), dz, precision=PRECISION).astype(w.dtype)
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
      activation: ``None`` or ``"tanh"``, applied to the f32 accumulator.
      impl: ``"auto"`` (pallas on GPU/TPU, jnp on CPU), ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      ``[..., N]`` in ``x.dtype``; the matmul accumulates in f32 at IEEE precision.

    Raises:
      ValueError / TypeError: mismatched K, wrong ranks, non-float inputs, unknown
        ``impl`` or ``activation``.

    Equivalent to: ``act(jnp.matmul(x, w, preferred_element_type=f32) + b).astype(x.dtype)``.
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
    a = _dense(x2, w, b, activation, impl)
    return a.reshape(*batch_shape, w.shape[1])


def dense_tanh(x, w, b=None, *, impl="auto"):
    """``tanh(x @ w + b)`` with a hand-written backward pass; see :func:`dense`.

    Equivalent to: ``dense(x, w, b, activation="tanh", impl=impl)``.
    """
    return dense(x, w, b, activation="tanh", impl=impl)
