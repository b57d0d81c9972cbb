"""The benchmark's baselines move no more data than the code their users write (H100, bf16).

Each op's ``user`` baseline (``bench/baselines.py``, fwd+bwd as the benchmark times it:
``jax.vjp`` applied to a cotangent) and its users' formulation written out literally here
are compiled for an H100 on this CPU; ``bench/passes.py`` counts the full reads and writes
of buffers of the large array's size (the [N, V] logits, x's [N, D], the [M, N] products)
in the optimized HLO, a gather or in-place scatter of one element per row not counted.
The baseline's count must not exceed the users' -- a wrapper that upcasts, recomputes or
masks where the users' code does not would make every speedup look larger than it is.

Measured (jax 0.11.2), the reference ``impl="xla"`` (the old baseline) against the users':

| op, bf16 | ``impl="xla"`` | users' code |
|---|---|---|
| xent [8192, 32768] | 4r+1w | 3r+1w |
| xent_prob [4096, 32768] (logits and labels both [N, V]) | 7r+2w | 5r+2w |
| layer_norm [8192, 4096] | 7r+3w | 5r+2w |
| rms_norm [8192, 4096] | 4r+2w | 4r+2w |
| linear xent, mean, no bias, x [4096, 2048] w [2048, 32768] | 7r+2w | 5r+2w |
| linear xent, per row, with bias | 6r+2w | 6r+2w |
| dense_tanh [8192, 4096] x [4096, 4096] (x, w, z all that size) | 7r+5w | 6r+3w |

The references fail this test with exactly those counts (the check bites; swap
``_baseline`` for ``impl="xla"`` to see it); :func:`test_the_count_bites_on_an_upcast`
keeps a planted handicap (optax on logits upcast to f32 by hand: 5r+2w) failing it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from fusedvjp.bench import baselines, cases as cases_lib, passes, static
from fusedvjp.ops import registry

optax = pytest.importorskip("optax")

BF16 = jnp.bfloat16
XENT = "softmax_cross_entropy_with_integer_labels"
XENT_PROB = "softmax_cross_entropy"
LCE = "linear_softmax_cross_entropy_with_integer_labels"


def _flax_layer_norm(x, scale, bias):
    """Flax's LayerNorm as its users get it: ``nnx.LayerNorm`` where Flax is installed,
    else its math (f32 statistics, ``var = max(0, E[x^2] - E[x]^2)``), written out."""
    try:
        from flax import nnx
    except ImportError:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.maximum(0.0, jnp.mean(x32 * x32, -1, keepdims=True) - mean * mean)
        return ((x32 - mean) * (jax.lax.rsqrt(var + 1e-6) * scale) + bias).astype(x.dtype)
    module = nnx.LayerNorm(x.shape[-1], epsilon=1e-6, dtype=x.dtype, param_dtype=scale.dtype, rngs=nnx.Rngs(0))
    module.scale.set_value(scale)
    module.bias.set_value(bias)
    return module(x)


def _flax_rms_norm(x, scale):
    """Flax's RMSNorm as its users get it: ``nnx.RMSNorm`` where Flax is installed, else its
    math (f32 ``E[x^2]``), written out."""
    try:
        from flax import nnx
    except ImportError:
        x32 = x.astype(jnp.float32)
        return (x32 * (jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * scale)).astype(x.dtype)
    module = nnx.RMSNorm(x.shape[-1], epsilon=1e-6, dtype=x.dtype, param_dtype=scale.dtype, rngs=nnx.Rngs(0))
    module.scale.set_value(scale)
    return module(x)


# op -> (shape, the users' code on the registry's arrays, elements of the large array).
USERS = {
    XENT: ((8192, 32768), lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(logits, labels)),
    XENT_PROB: ((4096, 32768), lambda logits, labels: optax.softmax_cross_entropy(logits, labels)),
    "layer_norm": ((8192, 4096), _flax_layer_norm),
    "rms_norm": ((8192, 4096), _flax_rms_norm),
    LCE: ((4096, 2048, 32768), lambda x, w, b, y: optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)),
    "dense_tanh": ((8192, 4096, 4096), lambda x, w, b: jnp.tanh(x @ w + b)),
    "dense_gelu": ((8192, 4096, 4096), lambda x, w, b: jax.nn.gelu(x @ w + b)),
}
# The fewest (reads, writes) any formulation can make (the registry's byte count: e.g. the
# cross-entropy's 2 reads and 1 write; dense reads x, w, then x, w, a, g and writes a, dx,
# dW, all [M, N]-sized at the llm shape; the materialized linear cross-entropy writes and
# reads its logits at least once): the counter must find at least that.
FLOOR = {XENT: (2, 1), XENT_PROB: (4, 2), "layer_norm": (3, 2), "rms_norm": (3, 2), LCE: (1, 1), "dense_tanh": (6, 3), "dense_gelu": (6, 3)}


def _count(fn, args, elements) -> passes.Passes:
    """The passes of ``fn`` compiled for an H100 at the abstract ``args``."""
    mesh = static.target_mesh("h100")
    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
        hlo = jax.jit(fn).lower(*placed).compile().as_text()
    return passes.count(hlo, elements)


def _fwd_bwd_args(op, shape):
    spec = registry.get(op)
    args = spec.abstract_inputs(shape, BF16)
    out = jax.eval_shape(spec.reference, *args)
    return (*args, jax.ShapeDtypeStruct(out.shape, out.dtype))


def _baseline(op, shape):
    """What the benchmark times as the baseline of ``op`` (the ``user`` row, fwd+bwd)."""
    return cases_lib.Case(op, shape, "bf16", "fwd+bwd").function(cases_lib.USER)


@pytest.fixture(autouse=True)
def _h100():
    reason = static.unavailable_reason("cuda")
    if reason:
        pytest.skip(f"cannot compile for h100: {reason}")


@pytest.mark.parametrize("op", list(USERS))
def test_baseline_moves_no_more_than_the_users_code(op):
    shape, users = USERS[op]
    elements = shape[0] * shape[-1]
    args = _fwd_bwd_args(op, shape)
    want = _count(cases_lib.Case(op, shape, "bf16", "fwd+bwd").wrap(users), args, elements)
    got = _count(_baseline(op, shape), args, elements)
    floor_reads, floor_writes = FLOOR[op]
    assert want.reads >= floor_reads and want.writes >= floor_writes, f"under the floor: {want} {want.where}"
    assert got.reads <= want.reads and got.writes <= want.writes, (
        f"{op} {shape} bf16: the baseline moves {got} passes, the users' code {want}\n"
        f"baseline: {got.where}\nusers': {want.where}")


def test_linear_xent_mean_moves_no_more_than_the_users_code():
    """The issue's row: ``optax...(x @ w, y).mean()``, value_and_grad w.r.t. x and w, no bias."""
    n, d, v = 4096, 2048, 32768
    args = (jax.ShapeDtypeStruct((n, d), BF16), jax.ShapeDtypeStruct((d, v), BF16),
            jax.ShapeDtypeStruct((n,), jnp.int32))

    def grad(loss):
        return jax.value_and_grad(loss, argnums=(0, 1))

    want = _count(grad(lambda x, w, y: optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()), args,
                  n * v)
    got = _count(grad(lambda x, w, y: baselines.linear_xent(x, w, None, y, reduction="mean")), args, n * v)
    assert got.reads <= want.reads and got.writes <= want.writes, f"baseline {got}, users' {want}"


def test_the_count_bites_on_an_upcast():
    """optax on logits upcast to f32 by hand: the scatter of the label's -1 then runs on an
    f32 copy, and the gradient is converted back -- one read and one write more."""
    shape, users = USERS[XENT]
    args = _fwd_bwd_args(XENT, shape)
    case = cases_lib.Case(XENT, shape, "bf16", "fwd+bwd")
    upcast = case.wrap(lambda logits, labels: users(logits.astype(jnp.float32), labels).astype(logits.dtype))
    want = _count(case.wrap(users), args, shape[0] * shape[1])
    got = _count(upcast, args, shape[0] * shape[1])
    assert got.total > want.total, f"upcast {got}, users' {want}"
