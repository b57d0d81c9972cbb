"""fusedvjp.nn: the NNX modules against Flax's own layers (same parameters), forward and
gradients, f32 and bf16, and under nnx.jit, nnx.remat and nnx.scan."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import DTYPES, REPO, assert_close, randn
from fusedvjp import nn, ops


IMPLS = ("jnp", "pallas")


def _randomize(module, rng, scale=0.5):
    """Every parameter set to fresh random values (a zero bias or unit scale hides bugs)."""
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda p: randn(rng, p.shape, p.dtype, scale) + (1.0 if p.ndim == 1 else 0.0),
                                    state))


def _copy_params(src, dst):
    """``dst``'s parameters set to ``src``'s: they must have the same names and shapes."""
    nnx.update(dst, nnx.state(src, nnx.Param))


def _value_and_grads(module, x, ct):
    """``<module(x), ct>`` and its gradients with respect to the parameters and x."""
    def f(m, x):
        return jnp.sum(m(x).astype(jnp.float32) * ct)

    value, (g_params, g_x) = nnx.value_and_grad(f, argnums=(0, 1))(module, x)
    return value, g_params, g_x


def _assert_same_grads(ours, theirs, dtype):
    flat_ours = dict(nnx.to_flat_state(ours))
    flat_theirs = dict(nnx.to_flat_state(theirs))
    assert flat_ours.keys() == flat_theirs.keys()
    for name in flat_ours:
        assert_close(flat_ours[name][...], flat_theirs[name][...], dtype, err_msg=str(name))


def _check_against(ours, theirs, x, rng, dtype):
    _copy_params(ours, theirs)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype and y_ours.shape == y_theirs.shape
    assert_close(y_ours, y_theirs, dtype)
    ct = randn(rng, y_ours.shape, jnp.float32)
    v_ours, g_ours, gx_ours = _value_and_grads(ours, x, ct)
    v_theirs, g_theirs, gx_theirs = _value_and_grads(theirs, x, ct)
    assert_close(gx_ours, gx_theirs, dtype)
    _assert_same_grads(g_ours, g_theirs, dtype)


class _ActivatedLinear(nnx.Linear):
    """nnx.Linear followed by an activation: Flax's spelling of ``Dense(activation=...)``,
    with the parameters under nnx.Linear's names."""

    def __init__(self, *args, fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.fn = fn

    def __call__(self, x):
        return self.fn(super().__call__(x))


ACTIVATIONS = {None: lambda z: z, "tanh": jnp.tanh, "gelu": lambda z: jax.nn.gelu(z, approximate=True)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "tanh", "gelu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_matches_nnx_linear(activation, use_bias, dtype, impl, rng):
    dtype = DTYPES[dtype]
    ours = nn.Dense(37, 10, activation=activation, use_bias=use_bias, dtype=dtype, impl=impl, rngs=nnx.Rngs(0))
    theirs = _ActivatedLinear(37, 10, fn=ACTIVATIONS[activation], use_bias=use_bias, dtype=dtype,
                              rngs=nnx.Rngs(1))
    _randomize(ours, rng)
    _check_against(ours, theirs, randn(rng, (3, 5, 37), dtype), rng, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_nnx_layer_norm(dtype, impl, rng):
    dtype = DTYPES[dtype]
    # epsilon of the order of the variance: a module that dropped it would fail.
    ours = nn.LayerNorm(37, epsilon=0.3, dtype=dtype, impl=impl, rngs=nnx.Rngs(0))
    theirs = nnx.LayerNorm(37, epsilon=0.3, dtype=dtype, rngs=nnx.Rngs(0))
    _randomize(ours, rng)
    _check_against(ours, theirs, randn(rng, (4, 7, 37), dtype) + 1.0, rng, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_scale,use_bias", [(True, False), (False, True), (False, False)])
def test_layer_norm_without_scale_or_bias(use_scale, use_bias, dtype, impl, rng):
    dtype = DTYPES[dtype]
    ours = nn.LayerNorm(37, use_scale=use_scale, use_bias=use_bias, dtype=dtype, impl=impl, rngs=nnx.Rngs(0))
    theirs = nnx.LayerNorm(37, use_scale=use_scale, use_bias=use_bias, dtype=dtype, rngs=nnx.Rngs(0))
    _randomize(ours, rng)
    _check_against(ours, theirs, randn(rng, (4, 7, 37), dtype, 3.0) + 1.0, rng, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_scale", [True, False])
def test_rms_norm_matches_nnx_rms_norm(use_scale, dtype, impl, rng):
    dtype = DTYPES[dtype]
    ours = nn.RMSNorm(37, epsilon=0.3, use_scale=use_scale, dtype=dtype, impl=impl, rngs=nnx.Rngs(0))
    theirs = nnx.RMSNorm(37, epsilon=0.3, use_scale=use_scale, dtype=dtype, rngs=nnx.Rngs(0))
    _randomize(ours, rng)
    _check_against(ours, theirs, randn(rng, (4, 7, 37), dtype) + 1.0, rng, dtype)


def _optax_head_loss(head, x, labels, where):
    """The head's loss as optax computes it: the f32 logits materialized, the mean over
    counted rows."""
    logits = jnp.dot(x.astype(jnp.float32), head.kernel[...], precision=jax.lax.Precision.HIGHEST)
    if head.bias is not None:
        logits = logits + head.bias[...]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), where=where)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_cross_entropy_matches_optax(use_bias, dtype, impl, rng):
    """Against optax on the f32 logits of the same (for bf16: bf16-rounded) inputs."""
    dtype = DTYPES[dtype]
    head = nn.LinearCrossEntropy(37, 300, use_bias=use_bias, chunk_size=128, impl=impl, rngs=nnx.Rngs(0))
    _randomize(head, rng, scale=0.3)
    x = randn(rng, (3, 11, 37), dtype)
    labels = jnp.asarray(rng.integers(0, 300, (3, 11)))
    where = jnp.asarray(rng.random((3, 11)) < 0.8)
    ours = lambda head, x: head(x, labels, where=where).astype(jnp.float32)  # noqa: E731
    theirs = lambda head, x: _optax_head_loss(head, x, labels, where)  # noqa: E731
    v_ours, (g_ours, gx_ours) = nnx.value_and_grad(ours, argnums=(0, 1))(head, x)
    v_theirs, (g_theirs, gx_theirs) = nnx.value_and_grad(theirs, argnums=(0, 1))(head, x)
    assert_close(v_ours, v_theirs, dtype)
    assert_close(gx_ours, gx_theirs, dtype)
    _assert_same_grads(g_ours, g_theirs, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_tied_to_an_embedding(impl, rng):
    """A tied head (the table of an nnx.Embed, transposed) against nnx.Embed.attend's
    logits and optax: the loss and the table's gradient, which sums the lookup's and the head's."""
    embed = nnx.Embed(300, 37, rngs=nnx.Rngs(0))
    head = nn.LinearCrossEntropy(37, 300, use_kernel=False, chunk_size=100, impl=impl, rngs=nnx.Rngs(1))
    assert nnx.state(head, nnx.Param) == nnx.State({})  # nothing of its own to train
    tokens = jnp.asarray(rng.integers(0, 300, (4, 9)))
    labels = jnp.asarray(rng.integers(0, 300, (4, 9)))

    def ours(embed):
        h = jnp.tanh(embed(tokens))
        return head(h, labels, kernel=embed.embedding[...].T)

    def theirs(embed):
        h = jnp.tanh(embed(tokens))
        return optax.softmax_cross_entropy_with_integer_labels(embed.attend(h), labels).mean()

    v_ours, g_ours = nnx.value_and_grad(ours)(embed)
    v_theirs, g_theirs = nnx.value_and_grad(theirs)(embed)
    assert_close(v_ours, v_theirs, jnp.float32)
    assert_close(g_ours["embedding"][...], g_theirs["embedding"][...], jnp.float32)


def test_linear_cross_entropy_passes_the_loss_options(rng):
    """ignore_index (a module option) and weight (a call option) reach the op:
    the results equal the op's own with the same options."""
    head = nn.LinearCrossEntropy(16, 50, ignore_index=-100, impl="jnp", rngs=nnx.Rngs(0))
    x = randn(rng, (6, 16), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 50, (6,))).at[2].set(-100)
    weight = jnp.asarray(rng.random(6), jnp.float32)
    kernel = head.kernel[...]
    op = ops.linear_softmax_cross_entropy_with_integer_labels
    assert_close(head(x, labels, reduction="sum", weight=weight),
                 op(x, kernel, labels, ignore_index=-100, weight=weight, reduction="sum", impl="jnp"), jnp.float32)
    assert_close(head(x, labels, reduction="none"), jnp.where(labels == -100, 0.0, op(
        x, kernel, jnp.where(labels == -100, 0, labels), reduction="none", impl="jnp")), jnp.float32)


def test_linear_cross_entropy_kernel_errors(rng):
    x, labels = randn(rng, (5, 8), jnp.float32), jnp.zeros((5,), jnp.int32)
    owned = nn.LinearCrossEntropy(8, 20, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_kernel=False"):
        owned(x, labels, kernel=jnp.zeros((8, 20)))
    tied = nn.LinearCrossEntropy(8, 20, use_kernel=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"pass the \[D, V\] = \[8, 20\] kernel"):
        tied(x, labels)
    with pytest.raises(ValueError, match=r"got \(20, 8\).*needs \.T"):
        tied(x, labels, kernel=jnp.zeros((20, 8)))


def test_linear_cross_entropy_logits_are_the_loss_logits(rng):
    head = nn.LinearCrossEntropy(16, 50, use_bias=True, logit_soft_cap=5.0, impl="jnp", rngs=nnx.Rngs(0))
    _randomize(head, rng)
    x, labels = randn(rng, (6, 16), jnp.float32), jnp.asarray(rng.integers(0, 50, (6,)))
    expected = optax.softmax_cross_entropy_with_integer_labels(head.logits(x), labels)
    assert_close(head(x, labels, reduction="none"), expected, jnp.float32)


def test_sharding_metadata_as_nnx_linear():
    """nnx.with_partitioning initializers annotate the parameters as they do nnx.Linear's."""
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",))
    with jax.set_mesh(mesh):
        ours = nn.Dense(8, 4, kernel_init=init, bias_init=bias_init, rngs=nnx.Rngs(0))
        theirs = nnx.Linear(8, 4, kernel_init=init, bias_init=bias_init, rngs=nnx.Rngs(0))
        head = nn.LinearCrossEntropy(8, 4, kernel_init=init, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(ours))
    assert specs == nnx.get_partition_spec(nnx.state(theirs))
    assert specs["kernel"].get_value() == jax.P(None, "model") and specs["bias"].get_value() == jax.P("model")
    assert ours.kernel[...].sharding.spec == jax.P(None, "model")  # placed, not only annotated
    assert nnx.get_partition_spec(nnx.state(head))["kernel"].get_value() == jax.P(None, "model")


# --- under Flax's transforms --------------------------------------------------------


class Block(nnx.Module):
    """A pre-norm residual MLP block of the three module kinds."""

    def __init__(self, d, *, impl, rngs):
        self.norm = nn.LayerNorm(d, impl=impl, rngs=rngs)
        self.up = nn.Dense(d, 2 * d, activation="tanh", impl=impl, rngs=rngs)
        self.down = nn.Dense(2 * d, d, impl=impl, rngs=rngs)

    def __call__(self, x):
        return x + self.down(self.up(self.norm(x)))


def _loss(block, head, x, labels):
    return head(block(x), labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_under_nnx_jit_and_remat(impl, rng):
    block = Block(24, impl=impl, rngs=nnx.Rngs(0))
    head = nn.LinearCrossEntropy(24, 40, impl=impl, rngs=nnx.Rngs(1))
    _randomize(block, rng, 0.3)
    x, labels = randn(rng, (5, 24), jnp.float32), jnp.asarray(rng.integers(0, 40, (5,)))
    grad = nnx.value_and_grad(_loss, argnums=(0, 1))
    eager_v, eager_g = grad(block, head, x, labels)
    jit_v, jit_g = nnx.jit(grad)(block, head, x, labels)

    def remat_loss(block, head, x, labels):
        return head(nnx.remat(lambda b, x: b(x))(block, x), labels)

    remat_v, remat_g = nnx.jit(nnx.value_and_grad(remat_loss, argnums=(0, 1)))(block, head, x, labels)
    for v, g in ((jit_v, jit_g), (remat_v, remat_g)):
        assert_close(v, eager_v, jnp.float32)
        for ours, theirs in zip(g, eager_g):
            _assert_same_grads(ours, theirs, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_over_layers(impl, rng):
    """Blocks stacked by nnx.vmap and run by nnx.scan equal the same blocks run in a loop,
    forward and gradients."""
    layers, d = 3, 16

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Block(d, impl=impl, rngs=nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), layers))
    _randomize(stack, rng, 0.3)
    x = randn(rng, (6, d), jnp.float32)
    ct = randn(rng, (6, d), jnp.float32)

    def scanned(stack, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(block, h):
            return block(h)

        return jnp.sum(step(stack, x) * ct)

    graphdef, state = nnx.split(stack)

    def looped(stack, x):
        _, state = nnx.split(stack)
        for i in range(layers):
            x = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(x)
        return jnp.sum(x * ct)

    v_scan, (g_scan, gx_scan) = nnx.jit(nnx.value_and_grad(scanned, argnums=(0, 1)))(stack, x)
    v_loop, (g_loop, gx_loop) = nnx.value_and_grad(looped, argnums=(0, 1))(stack, x)
    assert_close(v_scan, v_loop, jnp.float32)
    assert_close(gx_scan, gx_loop, jnp.float32)
    _assert_same_grads(g_scan, g_loop, jnp.float32)
    assert dict(nnx.to_flat_state(g_scan))[("up", "kernel")][...].shape == (layers, d, 2 * d)


def test_readme_model_runs(rng):
    """The README's ten-line NNX model, run as written: its loss equals the same model's
    with the logits materialized (nnx.Embed.attend) and optax."""
    text = (REPO / "README.md").read_text()
    code = text.split("```python\n# fusedvjp.nn in a model\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(code, scope)
    model = scope["TinyLM"](300, 32, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, 300, (2, 9)))
    labels = jnp.asarray(rng.integers(0, 300, (2, 9)))
    h = model.embed(tokens)
    h = h + model.down(model.up(model.norm(h)))
    expected = optax.softmax_cross_entropy_with_integer_labels(model.embed.attend(h), labels).mean()
    assert_close(model(tokens, labels), expected, jnp.float32)


def test_import_fusedvjp_needs_no_flax():
    """With flax unimportable, ``import fusedvjp`` and the ops work and ``fusedvjp.nn``
    raises an ImportError naming the extra."""
    script = textwrap.dedent("""
        import sys
        sys.modules["flax"] = None  # makes `import flax` raise ImportError
        import fusedvjp, fusedvjp.ops
        try:
            import fusedvjp.nn
        except ImportError as e:
            print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert 'ImportError: fusedvjp.nn needs Flax' in out.stdout and '".[flax]"' in out.stdout, out.stdout + out.stderr


def test_bad_dense_activation_is_named():
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        nn.Dense(4, 3, activation="relu", rngs=nnx.Rngs(0))(jnp.ones((2, 4)))


def test_dense_bf16_params_keep_their_dtype(rng):
    """param_dtype=bf16 with dtype=None computes in bf16 and returns bf16 gradients, as nnx.Linear."""
    layer = nn.Dense(12, 5, param_dtype=jnp.bfloat16, impl="jnp", rngs=nnx.Rngs(0))
    x = randn(rng, (3, 12), jnp.bfloat16)
    g = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)))(layer)
    assert layer(x).dtype == jnp.bfloat16 and g["kernel"][...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(g["bias"][...], np.full((5,), 3.0))
