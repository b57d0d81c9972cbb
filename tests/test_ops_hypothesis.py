"""Random shapes (hypothesis) for every registered op: the hand-written VJP against float64."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, float64_oracle
from fusedvjp.ops import registry


@pytest.mark.parametrize("spec", list(registry.REGISTRY.values()), ids=lambda s: s.name)
def test_random_shapes(spec):
    impl = "jnp"

    @settings(max_examples=6, deadline=None)
    @given(shape=st.tuples(*[st.integers(1, 70)] * len(spec.shape_names)), seed=st.integers(0, 2**32 - 1))
    def check(shape, seed):
        rng = np.random.default_rng(seed)
        args = spec.make_inputs(rng, shape, jnp.float32)
        out, vjp = registry.vjp_wrt(functools.partial(spec.fn, impl=impl), args, spec.diff_argnums)
        g = jnp.asarray(rng.standard_normal(out.shape), out.dtype)

        def oracle(a, g):
            o, f = registry.vjp_wrt(spec.reference, a, spec.diff_argnums)
            return o, f(g)

        want_out, want_grads = float64_oracle(oracle, args, g)
        assert_close(out, want_out, jnp.float32)
        for got, want in zip(vjp(g), want_grads):
            assert_close(got, want, jnp.float32)

    check()
