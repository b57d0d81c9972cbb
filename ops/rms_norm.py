"""RMS normalization over the last axis, with a hand-written VJP.

Per row ``x`` of length D (f32 math)::

    rstd = 1 / sqrt(mean(x**2) + eps)
    xhat = x * rstd
    y    = xhat * scale

The VJP, Jacobian first. With ``dxhat = g * scale`` (``dy/dxhat = diag(scale)``), what is
left is the Jacobian of ``xhat`` w.r.t. ``x`` for one row::

    d xhat_i / d x_j = rstd * (delta_ij - xhat_i xhat_j / D)

(``d rstd / d x_j = -rstd**3 x_j / D = -rstd**2 xhat_j / D``.) It is the identity minus one
rank-one term, symmetric, so its VJP is one per-row dot product and no D x D matrix::

    dx = rstd * (dxhat - xhat * mean(dxhat * xhat))

``scale`` is shared by all rows, so its cotangent is a column sum:
``dscale = sum_rows(g * xhat)``. ``scale=None`` (no scale) leaves it out of ``y``, gives
``dxhat = g`` and returns no cotangent for it; absence is static, so no path -- the
kernels included -- loads or multiplies a vector of ones.

Residuals: ``x``, ``scale`` and the f32 ``rstd`` per row, an [N] vector (4 bytes per row
against ``D * itemsize`` for a row of ``x``): the backward recomputes ``xhat = x * rstd``
from the ``x`` it reads anyway, so no [N, D] ``xhat`` is kept. ``rstd`` stays f32 for the
reason layer_norm's does (a bf16 ``rstd`` would put an error of up to 2**-9 into every
``xhat`` and ``dx``).

``eps`` is checked in the compute dtype, where it is added: at least 8.2e-26 in f32 (as
layer_norm's), so that a zero row's ``rsqrt(eps)`` and its derivative stay finite; a
zero row then gives ``y = 0`` and finite gradients.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fusedvjp.kernels._common import check_variance_eps
from fusedvjp.ops import _sharding
from fusedvjp.ops._dispatch import (
    check_float,
    check_static_float,
    compute_dtype,
    resolve_impl,
    reverse_mode_only,
    run_kernel,
)


def rms_norm_reference(x, scale=None, *, eps=1e-6):
    """The ``impl="xla"`` path: plain jnp, differentiated by JAX's autodiff.

    Equivalent to: ``(x * rsqrt(mean(x**2) + eps) * scale).astype(x.dtype)`` over the last
    axis, in f32 (f64 for f64 inputs); a ``None`` scale is left out.
    """
    y, _ = _forward_jnp(x, scale, eps=eps)
    return y


# --- under sharding (ops/_sharding.py) ----------------------------------------------------
# Rows (m) split: each device normalizes its own rows, and the backward's dscale, a sum
# over the rows, is all-reduced. The feature axis (d) is what rstd reduces over; the
# kernels need it whole, so a split d is gathered first. An absent scale has no entry.


def _forward_layout(has_scale: bool) -> _sharding.Layout:
    return _sharding.Layout(("m d", *("d",) * has_scale), ("m d", "m"), whole=("d",))


def _backward_layout(has_scale: bool) -> _sharding.Layout:
    return _sharding.Layout(("m d", *("d",) * has_scale, "m", "m d"), ("m d", *("d",) * has_scale),
                            sums=("", *("m",) * has_scale), whole=("d",))


# --- custom_vjp: primal and forward rule share _forward ------------------------------------


def _forward_jnp(x, scale, *, eps):
    """x [..., D] -> (y [..., D] in x's dtype, rstd [...] in the compute dtype)."""
    ct = compute_dtype(x.dtype)
    x32 = x.astype(ct)
    rstd = lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + eps)
    y = x32 * rstd[..., None]
    if scale is not None:
        y = y * scale.astype(ct)
    return y.astype(x.dtype), rstd


def _forward(x, scale, eps, impl, return_residuals):
    """x [N, D], scale [D] in x's dtype or None -> y [N, D] (+ residuals)."""
    from fusedvjp.kernels import rms_norm as kernels

    y, rstd = run_kernel(
        impl,
        functools.partial(kernels.rms_norm_fwd, eps=eps),
        functools.partial(_forward_jnp, eps=eps),
        (x, scale),
        "rms_norm",
        _forward_layout(scale is not None),
    )
    # x and scale are read again by the backward; rstd (f32 [N]) rebuilds xhat = x * rstd.
    return (y, (x, scale, rstd)) if return_residuals else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, scale, eps, impl):
    return _forward(x, scale, eps, impl, return_residuals=False)


def _rms_norm_fwd(x, scale, eps, impl):
    return _forward(x, scale, eps, impl, return_residuals=True)


def _backward_jnp(x, scale, rstd, g):
    """The hand-written VJP in jnp: (dx, dscale or None), in x's dtype."""
    d = x.shape[-1]
    ct = rstd.dtype
    g32 = g.astype(ct)
    xhat = x.astype(ct) * rstd[:, None]
    dxhat = g32 if scale is None else g32 * scale.astype(ct)
    c1 = jnp.sum(dxhat * xhat, axis=-1, keepdims=True) / d
    dx = rstd[:, None] * (dxhat - xhat * c1)
    # scale has x's dtype here (the public function casts it).
    dscale = None if scale is None else jnp.sum(g32 * xhat, axis=0).astype(x.dtype)
    return dx.astype(x.dtype), dscale


def _rms_norm_bwd(eps, impl, saved, g):
    del eps  # rstd already holds it
    from fusedvjp.kernels import rms_norm as kernels

    x, scale, rstd = saved
    dx, dscale = run_kernel(impl, kernels.rms_norm_bwd, _backward_jnp, (x, scale, rstd, g), "rms_norm",
                            _backward_layout(scale is not None))
    # Inside shard_map a replicated input's cotangent is summed over the axes it varies on.
    return _sharding.match_cotangent(dx, x), _sharding.match_cotangent(dscale, scale)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# --- public API ----------------------------------------------------------------------------


def _check(x, scale) -> None:
    check_float("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {x.shape}")
    if scale is not None:
        check_float("scale", scale)
        d = x.shape[-1]
        if scale.shape != (d,):
            raise ValueError(f"scale must have shape (D,) = ({d},) to match x {x.shape}, got {scale.shape}")


def rms_norm(x, scale=None, *, eps=1e-6, impl="auto"):
    """RMS normalization over the last axis, with a hand-written backward pass.

    Args:
      x: ``[..., D]`` floating input.
      scale: ``[D]`` multiplier, or None for none (then no ``dscale``). Cast to ``x.dtype``.
      eps: a concrete Python float, added to the mean square in the compute dtype (f32;
        f64 for f64 inputs), where it must be at least 8.2e-26 (f32; 1.3e-205 for f64) so
        that a zero row's ``rsqrt(eps)`` and its derivative stay finite.
      impl: ``"auto"`` (pallas on GPU/TPU, jnp on CPU), ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      ``[..., D]`` in ``x.dtype``; the statistics and the scaling are computed in f32 (f64
      for f64 inputs on the xla and jnp paths; the kernels refuse f64).

    Raises:
      TypeError: non-float ``x`` or ``scale``; a traced ``eps``.
      ValueError: ``scale`` not of shape ``(D,)``, ``D == 0``, ``eps`` not a finite number
        > 0 or too small in the compute dtype (see ``eps``), unknown ``impl``.

    Equivalent to: ``x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + eps) * scale``,
    in f32, cast to ``x.dtype`` (no ``* scale`` when None).
    """
    x = jnp.asarray(x)
    scale = None if scale is None else jnp.asarray(scale)
    _check(x, scale)
    eps = check_static_float("eps", eps, 0.0, math.inf, lo_open=True)
    check_variance_eps("eps", eps, compute_dtype(x.dtype))  # in the dtype it is added in
    impl = resolve_impl(impl)
    # Mixed precision as in ops.dense: the parameter is cast to the activation dtype
    # outside the custom_vjp, so autodiff returns its cotangent in its own dtype.
    scale = None if scale is None else scale.astype(x.dtype)
    if impl == "xla":
        return rms_norm_reference(x, scale, eps=eps)
    rows = math.prod(x.shape[:-1])
    with reverse_mode_only("rms_norm", impl):
        y = _rms_norm(x.reshape(rows, x.shape[-1]), scale, eps, impl)
    return y.reshape(x.shape)
