"""Train a small byte-level GPT on the Python standard library: ``python -m fusedvjp.model.lm``.

The model is built from :mod:`fusedvjp.nn` (pre-norm blocks: ``LayerNorm`` → causal
attention, ``LayerNorm`` → ``Dense(activation)`` → ``Dense``; the LM head and its loss one
``LinearCrossEntropy``, tied to the byte embedding by default) and trained with optax's
adamw on the corpus of :mod:`fusedvjp.model.lm_data` (no download). It prints the
validation loss and bits per byte, writes ``metrics.json``, ``curves.png`` and
``sample.txt`` (text generated from the trained model) to ``--out``, and prints the
compiled temporaries of the LM-head loss's ``value_and_grad``, fused against
``impl="xla"``, at its own shape and at a 128k vocabulary (compiled, not run).

Needs optax and flax: ``pip install -c constraints.txt -e ".[flax]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time

try:
    import optax
    from flax import nnx

    from fusedvjp import nn
except ImportError as e:
    raise ImportError(f"the LM example needs flax and optax ({e}); install the extra: "
                      "pip install -c constraints.txt -e \".[flax]\"") from e

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fusedvjp import ops
from fusedvjp.model import distributed
from fusedvjp.model import lm_data
from fusedvjp.model.train import prepare_out
from fusedvjp.ops import IMPLS
from fusedvjp.ops._dispatch import resolve_impl

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
VOCAB = 256  # bytes


@dataclasses.dataclass(frozen=True)
class Config:
    seq_len: int = 128
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    activation: str = "gelu"
    tied: bool = True
    dtype: str = "f32"  # the computation dtype; parameters are f32
    impl: str = "auto"


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention in plain jnp (softmax in f32); projections are
    ``nn.Dense``."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d, dtype = cfg.d_model, DTYPES[cfg.dtype]
        self.heads = cfg.heads
        # GPT-2's q/k/v biases less the two that do nothing: a bias on k adds q·b, one
        # constant per query row, which the softmax over keys cancels (its gradient is 0,
        # and adamw would turn that gradient's roundoff into full-size steps); a bias on v
        # adds b to every output row (the weights sum to 1), which proj's bias already does.
        self.q = nn.Dense(d, d, dtype=dtype, kernel_init=_init(0.02), impl=cfg.impl, rngs=rngs)
        self.kv = nn.Dense(d, 2 * d, use_bias=False, dtype=dtype, kernel_init=_init(0.02), impl=cfg.impl,
                           rngs=rngs)
        self.proj = nn.Dense(d, d, dtype=dtype, kernel_init=_init(0.02 / math.sqrt(2 * cfg.layers)),
                             impl=cfg.impl, rngs=rngs)

    def __call__(self, x):  # [B, T, D]
        b, t, d = x.shape
        q = self.q(x).reshape(b, t, self.heads, d // self.heads)
        k, v = jnp.split(self.kv(x).reshape(b, t, 2 * self.heads, d // self.heads), 2, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d // self.heads)
        causal = jnp.tril(jnp.ones((t, t), bool))
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return self.proj(o.astype(x.dtype).reshape(b, t, d))


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d, dtype, impl = cfg.d_model, DTYPES[cfg.dtype], cfg.impl
        self.norm1 = nn.LayerNorm(d, dtype=dtype, impl=impl, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.norm2 = nn.LayerNorm(d, dtype=dtype, impl=impl, rngs=rngs)
        self.up = nn.Dense(d, cfg.mlp_ratio * d, activation=cfg.activation, dtype=dtype,
                           kernel_init=_init(0.02), impl=impl, rngs=rngs)
        self.down = nn.Dense(cfg.mlp_ratio * d, d, dtype=dtype, kernel_init=_init(0.02 / math.sqrt(2 * cfg.layers)),
                             impl=impl, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(self.up(self.norm2(x)))


class GPT(nnx.Module):
    """Byte embedding + learned positions → blocks → final LayerNorm → LM head (GPT-2's
    layout and its 0.02 init, the residual projections scaled by ``1/sqrt(2·layers)``)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        self.embed = nnx.Embed(VOCAB, cfg.d_model, dtype=dtype, embedding_init=_init(0.02), rngs=rngs)
        self.pos = nnx.Param(_init(0.01)(rngs.params(), (cfg.seq_len, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.d_model, dtype=dtype, impl=cfg.impl, rngs=rngs)
        self.head = nn.LinearCrossEntropy(cfg.d_model, VOCAB, use_kernel=not cfg.tied, dtype=dtype,
                                          kernel_init=_init(0.02), impl=cfg.impl, rngs=rngs)

    def hidden(self, tokens):  # [B, T] int -> [B, T, D]
        x = self.embed(tokens) + self.pos[: tokens.shape[1]].astype(DTYPES[self.cfg.dtype])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _head_kernel(self):
        # Tied: the [V, D] byte table serves as the [D, V] head kernel; its gradient sums
        # the lookup's and the head's.
        return self.embed.embedding[...].T if self.cfg.tied else None

    def __call__(self, tokens, targets):
        """The mean next-byte cross-entropy (nats per byte), in f32."""
        loss = self.head(self.hidden(tokens), targets, kernel=self._head_kernel())
        return loss.astype(jnp.float32)

    def logits(self, tokens):
        return self.head.logits(self.hidden(tokens), kernel=self._head_kernel())


def _init(std: float):
    return nnx.initializers.normal(std)


# --- training ---------------------------------------------------------------------------


def make_optimizer(lr: float, steps: int, warmup: int):
    """adamw (b2 0.95, weight decay 0.1 on matrices only) after global-norm clipping at 1,
    with linear warmup and cosine decay to lr/10."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=min(warmup, steps - 1) if steps > 1 else 0,
                                                  decay_steps=max(steps, 1), end_value=lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask))


def config_from_args(args) -> Config:
    return Config(seq_len=args.seq_len, d_model=args.d_model, layers=args.layers, heads=args.heads,
                  activation=args.activation, tied=not args.untied, dtype=args.dtype, impl=args.impl)


def train(args: argparse.Namespace, corpus: lm_data.Corpus, log=print) -> dict:
    """Trains for ``args.steps`` steps; returns the metrics (and the model under "model")."""
    mesh = None
    if args.data_parallel:
        distributed.check_batch_size(args.batch_size, jax.device_count())
        mesh = distributed.data_mesh()
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        return _train(args, corpus, mesh, log)


def _train(args, corpus, mesh, log) -> dict:
    cfg = config_from_args(args)
    model = GPT(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(args.lr, args.steps, args.warmup)
    opt_state = tx.init(params)
    if mesh is not None:
        params, opt_state = distributed.replicate(mesh, (params, opt_state))

    def loss_fn(params, x, y):
        return nnx.merge(graphdef, params)(x, y)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)

    def put(x, y):
        return (jnp.asarray(x), jnp.asarray(y)) if mesh is None else distributed.shard_batch(mesh, x, y)

    val_x, val_y = lm_data.windows(corpus.validation, lm_data.even_starts(
        corpus.validation, args.eval_batches * args.batch_size, cfg.seq_len), cfg.seq_len)

    def validate(params) -> float:
        losses = [eval_loss(params, *put(val_x[i:i + args.batch_size], val_y[i:i + args.batch_size]))
                  for i in range(0, len(val_x), args.batch_size)]
        return float(np.mean(jax.device_get(losses)))

    rng = np.random.default_rng(args.seed)
    step_losses, evals, step_seconds = [], [], []
    bar = tqdm(range(1, args.steps + 1), desc="train", disable=args.no_progress, file=sys.stderr)
    start = time.perf_counter()
    for step in bar:
        x, y = lm_data.windows(corpus.train, lm_data.random_starts(rng, corpus.train, args.batch_size, cfg.seq_len),
                               cfg.seq_len)
        t0 = time.perf_counter()
        params, opt_state, loss = train_step(params, opt_state, *put(x, y))
        loss = float(loss)  # waits for the step: the per-step time is the step's
        step_seconds.append(time.perf_counter() - t0)
        step_losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            val = validate(params)
            evals.append({"step": step, "val_loss": val, "val_bits_per_byte": val / math.log(2)})
            if not args.no_progress:
                bar.write(f"step {step}/{args.steps} | train loss {loss:.4f} | val loss {val:.4f} | "
                          f"{val / math.log(2):.3f} bits/byte", file=sys.stderr)
    total = time.perf_counter() - start
    final = evals[-1]
    # The first step includes compilation; the median of the rest is the step time.
    steady = step_seconds[1:] or step_seconds
    log(f"validation loss {final['val_loss']:.4f} nats/byte = {final['val_bits_per_byte']:.3f} bits/byte after "
        f"{args.steps} steps ({total:.1f} s: first step {step_seconds[0]:.2f} s with compilation, then "
        f"{np.median(steady) * 1e3:.0f} ms/step median)")
    return {
        "impl": args.impl,
        "device": str(jax.devices()[0].device_kind),
        "devices": 1 if mesh is None else mesh.size,
        "jax_version": jax.__version__,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "corpus")},
        "corpus": {"root": corpus.root, "train_bytes": int(len(corpus.train)),
                   "validation_bytes": int(len(corpus.validation)), "train_files": corpus.train_files,
                   "validation_files": corpus.validation_files},
        "parameters": int(sum(p.size for p in jax.tree.leaves(params))),
        "step_losses": step_losses,
        "evals": evals,
        "seconds_total": total,
        "seconds_first_step": step_seconds[0],
        "seconds_per_step_median": float(np.median(steady)),
        "model": nnx.merge(graphdef, params if mesh is None else jax.device_get(params)),
    }


def generate(model: GPT, prompt: bytes, length: int, *, seed: int, temperature: float = 0.8) -> bytes:
    """``length`` bytes sampled after ``prompt`` (the last ``seq_len`` bytes as context)."""
    t = model.cfg.seq_len
    graphdef, params = nnx.split(model)

    @jax.jit
    def next_byte(params, window, pos, key):  # window [1, T]: the context, left-aligned
        logits = nnx.merge(graphdef, params).logits(window)[0, pos].astype(jnp.float32)
        return jax.random.categorical(key, logits / temperature)

    out = bytearray(prompt)
    key = jax.random.key(seed)
    for i in range(length):
        context = out[-t:]
        window = np.zeros((1, t), np.int32)
        window[0, :len(context)] = np.frombuffer(bytes(context), np.uint8)
        out.append(int(next_byte(params, jnp.asarray(window), len(context) - 1, jax.random.fold_in(key, i))))
    return bytes(out)


# --- memory of the LM-head loss -----------------------------------------------------------


def head_loss_temp_bytes(n: int, d: int, v: int, dtype, impl: str) -> int:
    """XLA's temporary allocation of ``jax.value_and_grad`` of the mean LM-head loss with
    respect to x [n, d] and w [d, v], compiled for the default device, not run."""
    def loss(x, w, y):
        return ops.linear_softmax_cross_entropy_with_integer_labels(x, w, y, reduction="mean", impl=impl)

    args = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def memory_table(shapes) -> list[dict]:
    """Rows ``{n, d, v, dtype, fused_impl, fused_bytes, xla_bytes, logits_f32_bytes}``: the
    fused loss under ``impl="auto"`` (what it resolves to is named) against ``impl="xla"``."""
    fused_impl = resolve_impl("auto")
    rows = []
    for n, d, v, dtype in shapes:
        rows.append({"n": n, "d": d, "v": v, "dtype": jnp.dtype(dtype).name, "fused_impl": fused_impl,
                     "fused_bytes": head_loss_temp_bytes(n, d, v, dtype, "auto"),
                     "xla_bytes": head_loss_temp_bytes(n, d, v, dtype, "xla"),
                     "logits_f32_bytes": n * v * 4})
    return rows


def format_memory_table(rows) -> str:
    lines = ["LM-head loss, value_and_grad temporaries (compiled, not run):",
             f"{'N x D x V':>22} {'dtype':>5} | {'fused':>10} | {'xla':>10} | {'xla/fused':>9}"]
    for r in rows:
        shape = f"{r['n']} x {r['d']} x {r['v']}"
        lines.append(f"{shape:>22} {r['dtype']:>5} | {r['fused_bytes'] / 2**20:>7.1f} MiB | "
                     f"{r['xla_bytes'] / 2**20:>6.1f} MiB | {r['xla_bytes'] / max(r['fused_bytes'], 1):>8.1f}x")
    lines.append(f"fused = impl=\"auto\" ({rows[0]['fused_impl']} on {jax.default_backend()}); "
                 "xla = the [N, V] logits materialized, autodiff")
    return "\n".join(lines)


LARGE_HEAD = (4096, 1024, 128256, jnp.bfloat16)  # a Llama-3-sized vocabulary


# --- plots and the command line -------------------------------------------------------------


def plot_curves(metrics: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(metrics["step_losses"]) / math.log(2)
    steps = np.arange(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.35, label="train (per step)")
    window = max(1, len(losses) // 20)
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"train ({window}-step mean)")
    ev = metrics["evals"]
    ax.plot([e["step"] for e in ev], [e["val_bits_per_byte"] for e in ev], marker="o", label="validation")
    ax.set(xlabel="step", ylabel="bits per byte", title="Byte-level GPT on the Python standard library")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusedvjp.model.lm", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--activation", choices=("gelu", "tanh"), default="gelu",
                   help="the MLP's, fused into its first Dense")
    p.add_argument("--untied", action="store_true", help="a separate LM-head kernel (default: tied to the embedding)")
    p.add_argument("--lr", type=float, default=3e-3, help="adamw's peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--seed", type=int, default=0, help="init, batches and sampling")
    p.add_argument("--impl", choices=IMPLS, default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="f32", help="computation dtype (parameters stay f32)")
    p.add_argument("--data-parallel", action="store_true",
                   help="split each batch over every device (parameters replicated); --batch-size must be a "
                        "multiple of the device count")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8, help="validation windows: this many batches")
    p.add_argument("--sample-bytes", type=int, default=200, help="bytes to generate into sample.txt (0: none)")
    p.add_argument("--no-memory-report", action="store_true", help="skip the LM-head memory table")
    p.add_argument("--corpus", metavar="DIR", default=None,
                   help="train on the .py/.rst/.txt files under DIR instead of the standard library")
    p.add_argument("--out", default="runs/lm", help="where metrics.json, curves.png, sample.txt go")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "d_model", "layers", "heads", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.sample_bytes < 0:
        p.error("--warmup and --sample-bytes must be >= 0")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = prepare_out(args.out)
    if args.data_parallel:
        try:
            distributed.check_batch_size(args.batch_size, jax.device_count())
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        corpus = lm_data.load(args.corpus)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"corpus: {corpus.root}: {corpus.train_files} files / {len(corpus.train) / 1e6:.1f} MB train, "
          f"{corpus.validation_files} files / {len(corpus.validation) / 1e6:.1f} MB validation")
    print(f"impl={args.impl} dtype={args.dtype} device={jax.devices()[0].device_kind} "
          f"devices={jax.device_count() if args.data_parallel else 1}")
    metrics = train(args, corpus)
    model = metrics.pop("model")
    if not args.no_memory_report:
        own = (args.batch_size * args.seq_len, args.d_model, VOCAB, DTYPES[args.dtype])
        metrics["memory"] = memory_table([own, LARGE_HEAD])
        print(format_memory_table(metrics["memory"]))
    if args.sample_bytes:
        text = generate(model, b"def ", args.sample_bytes, seed=args.seed)
        metrics["sample"] = text.decode("utf-8", errors="replace")
        (out / "sample.txt").write_bytes(text)
        print("sample:\n" + metrics["sample"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(metrics, out / "curves.png")
    written = ["metrics.json", "curves.png"] + (["sample.txt"] if args.sample_bytes else [])
    print("wrote " + ", ".join(str(out / name) for name in written))
    return metrics


if __name__ == "__main__":
    main()
