"""Generic numerics tests, generated from ``fusedvjp.ops.registry`` for every registered op.

For each op x test shape x dtype x option set x impl: the forward against the float64
reference, and the VJP with a random cotangent against ``jax.vjp`` of the float64
reference. ``impl="pallas"`` runs the kernels in interpret mode on this CPU machine.
Then ``check_grads`` on the jnp path, and lowering of the VJP for an abstract H100 and
TPU with the kernel's custom call asserted in the module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import DTYPES, KERNEL_CUSTOM_CALL, assert_close, float64_oracle, lower_for
from fusedvjp.ops import registry

SPECS = list(registry.REGISTRY.values())
IMPLS = ("xla", "jnp", "pallas")


def _cases():
    for spec in SPECS:
        for shape in spec.test_shapes:
            for i, options in enumerate(spec.options):
                for dname in DTYPES:
                    yield pytest.param(spec, shape, options, dname,
                                       id=f"{spec.name}-{'x'.join(map(str, shape))}-opt{i}-{dname}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec,shape,options,dname", list(_cases()))
def test_forward_and_vjp_match_float64(spec, shape, options, dname, impl, rng):
    dtype = DTYPES[dname]
    args = spec.make_inputs(rng, shape, dtype)
    diff = tuple(args[i] for i in spec.diff_argnums)
    out, vjp = registry.vjp_wrt(functools.partial(spec.fn, impl=impl, **options), args, spec.diff_argnums)
    assert out.dtype == args[0].dtype, f"output dtype {out.dtype} != input dtype {args[0].dtype}"
    g = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
    grads = vjp(g)

    def ref_vjp(a, g):
        o, f = registry.vjp_wrt(functools.partial(spec.reference, **options), a, spec.diff_argnums)
        return o, f(g)

    ref_out, ref_grads = float64_oracle(ref_vjp, args, g)
    assert np.isfinite(np.asarray(out, np.float64)).all(), "non-finite output: an unwritten or unmasked block"
    assert_close(out, ref_out, dtype, err_msg=f"{spec.name} forward ({impl})")
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert got.dtype == diff[i].dtype, f"grad {i} dtype {got.dtype} != {diff[i].dtype}"
        assert np.isfinite(np.asarray(got, np.float64)).all(), f"non-finite grad {i}"
        assert_close(got, want, dtype, err_msg=f"{spec.name} grad of arg {spec.diff_argnums[i]} ({impl})")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_check_grads_jnp_path(spec, rng):
    """Finite differences against the hand-written VJP, at a small shape (f32 FD is coarse)."""
    shape = tuple(min(d, 8) for d in spec.test_shapes[0])
    args = spec.make_inputs(rng, shape, jnp.float32)
    for options in spec.options:
        f, diff = registry.differentiable(functools.partial(spec.fn, impl="jnp", **options), args, spec.diff_argnums)
        check_grads(f, diff, order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


def _lowering_cases():
    for spec in SPECS:
        for shape, dname in spec.lowering_shapes:
            for i, options in enumerate(spec.options):
                for platform in ("cuda", "tpu"):
                    yield pytest.param(spec, shape, dname, options, platform,
                                       id=f"{spec.name}-{'x'.join(map(str, shape))}-{dname}-opt{i}-{platform}")


@pytest.mark.parametrize("spec,shape,dname,options,platform", list(_lowering_cases()))
def test_vjp_lowers_to_the_kernel(spec, shape, dname, options, platform):
    """jax.grad through the op with impl="pallas" lowers for an abstract H100/TPU with the kernel inside."""
    dtype = DTYPES[dname]
    args = spec.abstract_inputs(shape, dtype)

    def loss(*a):
        return jnp.mean(spec.fn(*a, impl="pallas", **options).astype(jnp.float32))

    text = lower_for(platform, jax.grad(loss, argnums=spec.diff_argnums), *args)
    # At least one forward and one backward kernel; nothing interpreted or jnp.
    calls = text.count(KERNEL_CUSTOM_CALL[platform])
    assert calls >= 2, f"{calls} {KERNEL_CUSTOM_CALL[platform]} custom calls in the lowered module, expected >= 2"
