"""Generic numerics tests, generated from ``fusedvjp.ops.registry`` for every registered op.

For each op x test shape x dtype x option set x impl: the forward against the float64
reference, and the VJP with a random cotangent against ``jax.vjp`` of the float64
reference (the cross-entropy ops' bf16 gradients: entry by entry against an exact numpy
oracle). ``impl="pallas"`` runs the kernels in interpret mode on this CPU machine.
Then ``check_grads`` on the jnp path, and lowering of the value and VJP for an abstract
H100 and TPU with each of the op's kernels asserted, by name, as a custom call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import (
    DTYPES,
    assert_bf16_elementwise,
    assert_close,
    assert_kernels_lowered,
    float64_oracle,
    lower_for,
    lowered_kernel_names,
    softmax_cross_entropy_float64,
)
from fusedvjp.ops import registry

SPECS = list(registry.REGISTRY.values())
IMPLS = ("xla", "jnp", "pallas")

# Ops whose bf16 gradients are checked entry by entry (conftest.assert_bf16_elementwise):
# a cross-entropy gradient row is one entry near -1 and V - 1 entries near 1/V, which a
# tolerance scaled by the largest entry cannot see.
BF16_ELEMENTWISE = ("softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy")


def exact_grads_and_terms(spec, args, g, options):
    """[(exact gradient, term magnitudes)] per differentiable argument, numpy float64."""
    exact = softmax_cross_entropy_float64(args[0], args[1], g, **options)
    grads = [(exact.dlogits, exact.dlogits_terms), (exact.dlabels, exact.dlabels_terms)]
    return grads[: len(spec.diff_argnums)]


# The kernels (their `name=`) the forward and VJP of an op must call. An op not listed
# follows the scaffold's convention, fusedvjp_<op>_fwd and fusedvjp_<op>_bwd.
KERNELS = {
    "dense_tanh": ("fusedvjp_dense_fwd", "fusedvjp_dense_bwd_dx", "fusedvjp_dense_bwd_dw"),
    "dense": ("fusedvjp_dense_fwd", "fusedvjp_dense_bwd_dx", "fusedvjp_dense_bwd_dw"),
    "dense_gelu": ("fusedvjp_dense_fwd", "fusedvjp_dense_bwd_dx", "fusedvjp_dense_bwd_dw"),
    "softmax_cross_entropy_with_integer_labels": ("fusedvjp_xent_fwd", "fusedvjp_xent_bwd"),
    "softmax_cross_entropy": ("fusedvjp_xent_fwd", "fusedvjp_xent_bwd"),
    "linear_softmax_cross_entropy_with_integer_labels": ("fusedvjp_lce_stats", "fusedvjp_lce_dlogits"),
}


# On an H100 the bf16 dense cases (whole TMA tiles) go to the Mosaic GPU kernels, and the
# Triton backward of the others writes dz (and db) in a pass first (triton.use_dz_pass:
# K = 784 and 512 are many 16-wide steps).
DENSE_ON_CUDA = {
    "bf16": ("fusedvjp_dense_fwd_mgpu", "fusedvjp_dense_bwd_dx_mgpu", "fusedvjp_dense_bwd_dw_mgpu"),
    "f32": KERNELS["dense"] + ("fusedvjp_dense_bwd_dz",),
}


def kernels_of(spec, platform: str | None = None, dname: str | None = None) -> tuple[str, ...]:
    if platform == "cuda" and spec.name in ("dense", "dense_tanh", "dense_gelu"):
        return DENSE_ON_CUDA[dname]
    return KERNELS.get(spec.name, (f"fusedvjp_{spec.name}_fwd", f"fusedvjp_{spec.name}_bwd"))


def _cases():
    for spec in SPECS:
        for shape in spec.test_shapes:
            for i, options in enumerate(spec.options):
                for dname in DTYPES:
                    yield pytest.param(spec, shape, options, dname,
                                       id=f"{spec.name}-{'x'.join(map(str, shape))}-opt{i}-{dname}")


@pytest.mark.sample("shape", "dname")  # every shape and dtype per op, option set and impl
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
    elementwise = dtype == jnp.bfloat16 and spec.name in BF16_ELEMENTWISE
    exact = exact_grads_and_terms(spec, args, g, options) if elementwise else None
    for i, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        assert got.dtype == diff[i].dtype, f"grad {i} dtype {got.dtype} != {diff[i].dtype}"
        assert np.isfinite(np.asarray(got, np.float64)).all(), f"non-finite grad {i}"
        msg = f"{spec.name} grad of arg {spec.diff_argnums[i]} ({impl})"
        if elementwise:
            assert_bf16_elementwise(got, *exact[i], err_msg=msg)
        else:
            assert_close(got, want, dtype, err_msg=msg)


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
    """The op's value and gradient with impl="pallas" lower for an abstract H100/TPU with
    each of its kernels inside, by name (value_and_grad: with grad alone jit drops a
    forward kernel whose output the backward does not need, as dense's)."""
    dtype = DTYPES[dname]
    args = spec.abstract_inputs(shape, dtype)

    def loss(*a):
        return jnp.mean(spec.fn(*a, impl="pallas", **options).astype(jnp.float32))

    text = lower_for(platform, jax.value_and_grad(loss, argnums=spec.diff_argnums), *args)
    expected = kernels_of(spec, platform, dname)
    if any(name.endswith("_mgpu") for name in expected):
        assert lowered_kernel_names(text, platform) == [], "no Triton kernel where Mosaic GPU serves the case"
        assert text.count("mosaic_gpu_v2") == len(expected) and all(name in text for name in expected)
        return
    assert_kernels_lowered(text, platform, expected)
