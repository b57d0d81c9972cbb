"""The benchmark's opponent is what a user would write: no f32 x f32 matmul in a bf16 backward.

The ``user`` baselines (``bench/baselines.py``: optax, Flax's LayerNorm, ``jnp.tanh(x @ w +
b)``), ``impl="xla"`` (XLA's autodiff of the plain-jnp reference) and ``impl="jnp"`` (the
hand-written VJP in jnp) must run every matmul of a bf16 forward and backward on bf16
operands with f32 accumulation at default precision -- the tensor-core math the kernels
do and the math of ``jnp.tanh(x @ w + b)``. An f32 x f32 HIGHEST matmul there would be
about ten times slower on an H100, and a "speedup" measured against it meaningless. f32
inputs stay IEEE f32 (HIGHEST) on every path.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from fusedvjp.bench import baselines
from fusedvjp.ops import registry

IMPLS = ("user", "xla", "jnp")

_DOT = re.compile(r"stablehlo\.dot_general.*?precision = \[(\w+), (\w+)\].*?:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)")


def dots(fn, *args) -> list[tuple[str, str, str]]:
    """(lhs dtype, rhs dtype, precision) of every dot_general in the lowered ``fn``."""
    text = jax.jit(fn).lower(*args).as_text()
    found = []
    for line in text.splitlines():
        if "dot_general" not in line:
            continue
        m = _DOT.search(line)
        assert m, f"unparsed dot_general: {line.strip()}"
        found.append((m.group(3), m.group(4), m.group(1)))
    return found


def fwd_bwd(spec, impl):
    if impl == "user":
        if baselines.get(spec.name) is None:
            pytest.skip(f"{spec.name} has no user baseline")
        op = baselines.get(spec.name).fn
    else:
        op = functools.partial(spec.fn, impl=impl)

    def f(*args):
        out, vjp = registry.vjp_wrt(op, args, spec.diff_argnums)
        return out, vjp(jnp.ones_like(out))

    return f


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec", list(registry.REGISTRY.values()), ids=lambda s: s.name)
def test_bf16_forward_and_backward_matmuls_take_bf16_operands(spec, impl):
    shape = spec.test_shapes[0]
    found = dots(fwd_bwd(spec, impl), *spec.abstract_inputs(shape, jnp.bfloat16))
    bad = [d for d in found if d[:2] != ("bf16", "bf16") or d[2] != "DEFAULT"]
    assert not bad, f"{spec.name} impl={impl}: matmuls not bf16 x bf16 at DEFAULT: {bad} (all: {found})"
    if spec.name.startswith("dense"):
        assert len(found) == 3, found  # forward, dx, dW


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ("dense", "dense_tanh", "dense_gelu"))
def test_f32_matmuls_stay_ieee(name, impl):
    spec = registry.get(name)
    found = dots(fwd_bwd(spec, impl), *spec.abstract_inputs(spec.test_shapes[0], jnp.float32))
    assert len(found) == 3 and all(d == ("f32", "f32", "HIGHEST") for d in found), found


def test_the_check_bites_on_a_handicapped_baseline():
    """An f32 x f32 HIGHEST backward (the old reference) is caught."""

    def handicapped(x, w):
        z = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        return jnp.tanh(z).astype(x.dtype)

    def f(x, w):
        out, vjp = jax.vjp(handicapped, x, w)
        return vjp(jnp.ones_like(out))

    args = (jax.ShapeDtypeStruct((8, 16), jnp.bfloat16), jax.ShapeDtypeStruct((16, 4), jnp.bfloat16))
    found = dots(f, *args)
    assert [d for d in found if d[:2] == ("f32", "f32")], found
