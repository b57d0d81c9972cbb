"""Peers: other libraries' versions of our ops, timed in the same run on the same inputs.

Each peer is a :class:`Peer` in :data:`PEERS`; its rows appear in the table as extra impls
(``peer:tokamax``, ``peer:torch``, ``peer:torch.compile``, ``peer:liger``) with the same
bytes, flops and roofline columns and the speedup over the baseline (the faster of ``user``,
the users' code, and ``xla``). A peer that cannot run says
why (``results.json["peers"]["skipped"]``, and a section of results.md):

* JAX: tokamax -- ``tokamax.layer_norm`` (its Triton kernel) for our ``layer_norm`` and, with
  ``subtract_mean=False``, our ``rms_norm``, and
  ``tokamax.linear_softmax_cross_entropy_loss(x, labels, weights [D, V], reduction="none",
  implementation="chunked_xla")`` for our ``linear_softmax_cross_entropy_with_integer_labels``
  (0.0.17 has no GPU kernel for it: ``xla`` materializes the logits, ``chunked_xla`` is its
  memory-bounded one, ``mosaic_tpu`` a TPU's; ``chunked_xla`` is right only where V is a
  multiple of its 2048-column block, skipped elsewhere). Its other ops (attention, gated linear unit,
  ragged dot, triangle multiplication) have no counterpart here. optax's losses are our
  ``user`` rows already (``bench/baselines.py``).
* PyTorch on the same GPU: ``torch.nn.functional`` eager and under ``torch.compile``
  (cross-entropy with integer and with probability labels, layer_norm, rms_norm, ``tanh(addmm)``
  for dense_tanh, ``gelu(addmm, approximate="tanh")`` for dense_gelu, ``addmm`` for dense);
  Liger-Kernel's cross-entropy, layer_norm, rms_norm and fused linear cross-entropy; Apple's
  cut-cross-entropy (``linear_cross_entropy``) for the linear
  cross-entropy.

The linear cross-entropy peers, as the benchmark calls our op (no options: per-row losses,
``reduction="none"``, which all three serve exactly in the pinned versions of
bench/fetch_peer_wheels.sh), with its bias ``b``:

* torch takes the classifier as ``[V, D]`` (``nn.Linear``'s layout): ``w`` is transposed once
  per input copy (``ExternalOp.prepare``), outside the timed call; the gradient then comes
  back as ``dW^T``.
* Neither tokamax nor cut-cross-entropy takes a bias. It is folded into the matmul:
  ``x' = [x, 1, 0..]``, ``W' = [W; b; 0..]`` (D' = D + 1 rounded up to a multiple of 8, so
  rows stay 16-byte aligned), so ``x' W' = x W + b`` and ``dx``, ``dW``, ``db`` are parts of
  ``dx'`` and ``dW'``. For CCE it is built once with the transpose (outside the timing); for
  tokamax, a JAX peer with no preparation step, the concatenation is inside the timed call
  (one more pass over ``x`` and ``W`` each way).
* Liger's ``reduction="none"`` backward is exact only since linkedin/Liger-Kernel#1298
  (0.8.5: the forward defers the gradient to the backward); an older one scales every row
  by ``g[0]``, so its fwd+bwd is skipped.
* CCE runs with ``filter_eps=None`` (exact gradient, as ours; its default skips small
  softmax entries in the backward); its backward takes bf16/fp16 embeddings only, so f32
  fwd+bwd is skipped. tokamax takes no ``precision`` (NotImplementedError), so its f32
  matmuls would be TF32 on a GPU: f32 forwards run under
  ``jax.default_matmul_precision("highest")``, f32 fwd+bwd is skipped (its backward rule is
  traced outside that scope).

The contract is ours for every row: forward = the op's output (per-row losses: torch's
``reduction="none"``); fwd+bwd = forward plus the VJP of a random cotangent w.r.t. the
same arguments. Torch inputs are converted once per input copy from the JAX arrays (dlpack,
then a copy: Liger writes its gradient over its logits input, and nothing may change the
arrays the other rows read); labels become int64 once, as torch wants. Torch rows are timed
with ``torch.cuda.synchronize`` ending each call (wall) and, for device time, the profiler
trace when CUPTI saw their kernels, else CUDA events. f32 matmuls are IEEE on both sides
(``torch.backends.cuda.matmul.allow_tf32 = False``, as XLA's ``Precision.HIGHEST``).

On a CPU the peers are skipped ("not a GPU") unless named with ``--peers``; torch then runs
its CPU path (eager, or compiled if asked), which only checks the plumbing. Nothing here
imports torch, tokamax or liger before a peer is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

XENT = "softmax_cross_entropy_with_integer_labels"
XENT_PROB = "softmax_cross_entropy"
LCE = "linear_softmax_cross_entropy_with_integer_labels"
# The eps of our layer_norm's and rms_norm's defaults (the benchmark passes no options).
LAYER_NORM_EPS = 1e-6
RMS_NORM_EPS = 1e-6


class PeerSkip(Exception):
    """A peer cannot serve this case; the message says why (recorded, not an error row)."""


@dataclasses.dataclass
class Adapter:
    """How the harness hands inputs to a non-JAX framework and waits for it.

    Attributes:
      convert: one JAX array -> the framework's array (done once per input copy).
      vjp: ``(f, args, diff_argnums, g) -> (out, grads)``, a forward and its backward.
      prepare_grads: ``(args, diff_argnums) -> args`` readied for ``vjp`` (e.g. leaves that
        require grad).
      sync: waits for everything queued.
      to_numpy: an output -> numpy (for the check against the reference).
      event_time: runs a call between device events and returns its device seconds, or None
        where the framework has none.
      cleanup: frees cached memory after a case.
    """

    convert: Callable[[Any], Any]
    vjp: Callable[..., tuple[Any, Any]]
    prepare_grads: Callable[[list, Sequence[int]], list]
    sync: Callable[[], None]
    to_numpy: Callable[[Any], np.ndarray]
    event_time: Callable[[Callable[[], Any]], float] | None = None
    cleanup: Callable[[], None] = lambda: None


@dataclasses.dataclass(frozen=True)
class ExternalOp:
    """A peer's op for a non-JAX framework: ``fn(*args) -> out``; ``prepare`` adapts one
    converted input set once (e.g. labels to int64)."""

    fn: Callable[..., Any]
    prepare: Callable[[list], list] | None = None


@dataclasses.dataclass(frozen=True)
class Peer:
    """One peer library.

    Attributes:
      name: the row's impl name, ``peer:<library>``.
      ops: our op name -> builder. A JAX peer's builder takes the case and returns a JAX
        function of the op's arguments (forward only; the harness adds the VJP as for our
        impls); an external peer's returns an :class:`ExternalOp`. A builder raises
        :class:`PeerSkip` for a case it does not serve.
      availability: ``(platform, named) -> None`` if the peer can run here, else why not;
        ``named`` says the user asked for it by name.
      adapter: None for a JAX peer; else a factory ``platform -> Adapter``.
      no_match: functions of the library that resemble ours but compute something else
        -> why they are not compared (reported as skipped).
      note: how the peer is called (shown with its rows).
    """

    name: str
    ops: Mapping[str, Callable[[Any], Any]]
    availability: Callable[[str, bool], str | None]
    adapter: Callable[[str], Adapter] | None = None
    no_match: Mapping[str, str] = dataclasses.field(default_factory=dict)
    note: str = ""

    @property
    def short(self) -> str:
        return self.name.removeprefix("peer:")


PEERS: dict[str, Peer] = {}


def register(peer: Peer) -> Peer:
    if not peer.name.startswith("peer:"):
        raise ValueError(f"a peer's name starts with 'peer:', got {peer.name!r}")
    PEERS[peer.name] = peer
    return peer


def resolve(names: Sequence[str]) -> list[Peer]:
    """Peers by name (``torch`` or ``peer:torch``); raises ValueError for unknown ones."""
    out = []
    for name in names:
        full = name if name.startswith("peer:") else f"peer:{name}"
        if full not in PEERS:
            raise ValueError(f"unknown peer {name!r}; expected some of {', '.join(p.short for p in PEERS.values())}")
        out.append(PEERS[full])
    return out


def select(requested: str, platform: str, op_names: Sequence[str]) -> tuple[list[Peer], dict]:
    """The peers that run and the ``results.json["peers"]`` record.

    Args:
      requested: ``"auto"`` (every peer on a GPU/TPU, none on a CPU), ``"none"``, or a comma
        list of names (run where they can, the CPU included).
      platform: ``"gpu"``, ``"tpu"`` or ``"cpu"``.
      op_names: the ops of this run (to list what each peer does not cover).

    Returns:
      (peers to run, record with ``requested``, ``ran`` {peer: [ops]}, ``skipped``
      [{peer, op?, reason}] and ``not_covered`` {peer: [ops of this run it lacks]}).
    """
    record: dict[str, Any] = {"requested": requested, "ran": {}, "skipped": [], "not_covered": {}}
    if requested == "none":
        return [], record
    named = requested != "auto"
    candidates = resolve([n for n in requested.split(",") if n]) if named else list(PEERS.values())
    running = []
    for peer in candidates:
        if not named and platform == "cpu":
            why = "not a GPU (platform cpu): peers are timed on a GPU; name them with --peers to run their CPU path"
        else:
            try:
                why = peer.availability(platform, named)
            except Exception as e:  # noqa: BLE001 -- an import that breaks is a reason, not a crash
                why = f"{type(e).__name__}: {e}"
        if why:
            record["skipped"].append({"peer": peer.name, "reason": why})
            continue
        running.append(peer)
        record["ran"][peer.name] = [op for op in op_names if op in peer.ops]
        record["not_covered"][peer.name] = [op for op in op_names if op not in peer.ops]
        record["skipped"].extend({"peer": peer.name, "op": fn, "reason": why} for fn, why in peer.no_match.items())
    return running, record


# --- availability ------------------------------------------------------------------------------


def _importable(module: str) -> str | None:
    """None if ``module`` imports, else why (the exception, one line)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken install raising anything
        return f"{module} not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _torch_ok(platform: str, named: bool) -> str | None:
    why = _importable("torch")
    if why:
        return why
    import torch

    if platform == "gpu" and not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if platform == "tpu":
        return "torch peers run on a GPU (or, named, on the CPU), not on a TPU"
    return None


def _gpu_only(module: str, what: str) -> Callable[[str, bool], str | None]:
    def check(platform: str, named: bool) -> str | None:
        del named
        if platform != "gpu":
            return f"{what} runs on a CUDA GPU only (platform {platform})"
        return _importable(module) or _torch_ok(platform, True)

    return check


# --- tokamax (JAX) -------------------------------------------------------------------------------


def _stub_xprof() -> None:
    """tokamax imports ``xprof.cli.tools`` at import time for its own benchmarking helper,
    which we never call; the real xprof wheel is 32 MB plus duckdb and google-cloud-storage,
    too much to carry to the GPU machine. A stub module stands in when xprof is missing."""
    def unavailable(*args, **kwargs):
        raise RuntimeError("xprof is a stub here (fusedvjp.bench.peers): tokamax's benchmarking is not available")

    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"].get_kernel_stats_tool = unavailable


def import_tokamax():
    """``import tokamax``, with :func:`_stub_xprof` if xprof is the only thing missing."""
    try:
        return importlib.import_module("tokamax")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("xprof"):
            raise
    _stub_xprof()
    return importlib.import_module("tokamax")


def _tokamax_ok(platform: str, named: bool) -> str | None:
    del named
    if platform != "gpu":
        return f"tokamax.layer_norm's kernel is Triton: a CUDA GPU only (platform {platform})"
    try:
        tokamax = import_tokamax()
    except Exception as e:  # noqa: BLE001
        return f"tokamax not importable ({type(e).__name__}: {e})"
    del tokamax
    return None


def _tokamax_layer_norm(case):
    tokamax = import_tokamax()

    def layer_norm(x, scale, bias):
        return tokamax.layer_norm(x, scale, bias, epsilon=LAYER_NORM_EPS, implementation="triton")

    return layer_norm


def _tokamax_rms_norm(case):
    tokamax = import_tokamax()

    def rms_norm(x, scale):
        return tokamax.layer_norm(x, scale, None, epsilon=RMS_NORM_EPS, subtract_mean=False, implementation="triton")

    return rms_norm


def bias_fold_width(d: int) -> int:
    """Columns appended to x (a ones column, then zeros) and rows to W (b, then zeros) for a
    peer without a bias: D + width is a multiple of 8 (16-byte rows in bf16)."""
    return -(d + 1) % 8 + 1


# tokamax 0.0.17's chunked_xla pads W with zero columns to a multiple of its v_block_size
# (2048 by default, chunked_xla.py's Config) and never masks them: each padding column adds
# exp(0) to every row's sum of exponentials, so the losses and gradients are wrong unless V
# is a multiple of it (measured on CPU: 1.4e-2 relative at V = 1000, 0.55 at V = 10).
TOKAMAX_CHUNKED_V_BLOCK = 2048


def _tokamax_lce(case):
    v = case.shape[2]
    if v % TOKAMAX_CHUNKED_V_BLOCK:
        raise PeerSkip(f"tokamax's chunked_xla pads V = {v} to a multiple of {TOKAMAX_CHUNKED_V_BLOCK} with zero "
                       "logits it does not mask (wrong losses and gradients); its xla impl is our xla row")
    # tokamax cannot take a precision: an f32 forward is traced under HIGHEST here, but the
    # backward rule is traced later, outside this function, at JAX's GPU default (TF32).
    if case.dtype == "f32" and case.mode != "fwd":
        raise PeerSkip("tokamax.linear_softmax_cross_entropy_loss takes no precision (NotImplementedError): its "
                       "f32 backward matmuls would be TF32 on a GPU, against IEEE f32 in every other f32 row")
    import jax
    import jax.numpy as jnp

    tokamax = import_tokamax()

    def lce(x, w, b, labels):
        # No bias in tokamax: x' = [x, 1, 0..] [N, D'], w' = [w; b; 0..] [D', V].
        n, d = x.shape
        k = bias_fold_width(d)
        x1 = jnp.concatenate([x, jnp.ones((n, 1), x.dtype), jnp.zeros((n, k - 1), x.dtype)], axis=1)
        w1 = jnp.concatenate([w, b[None, :].astype(w.dtype), jnp.zeros((k - 1, w.shape[1]), w.dtype)], axis=0)
        scope = jax.default_matmul_precision("highest") if x.dtype == jnp.float32 else contextlib.nullcontext()
        with scope:
            loss = tokamax.linear_softmax_cross_entropy_loss(x1, labels, w1, reduction="none",
                                                             implementation="chunked_xla")
        return loss.astype(x.dtype)  # our output's dtype, so that the cotangent fits

    return lce


register(Peer(
    name="peer:tokamax",
    ops={"layer_norm": _tokamax_layer_norm, "rms_norm": _tokamax_rms_norm, LCE: _tokamax_lce},
    availability=_tokamax_ok,
    no_match={
        "tokamax.gated_linear_unit": "act(x @ W_gate) * (x @ W_up), not dense_tanh's tanh(x @ W + b)",
    },
    note="tokamax.layer_norm(implementation='triton'; subtract_mean=False for rms_norm); "
         "tokamax.linear_softmax_cross_entropy_loss(reduction='none', "
         "implementation='chunked_xla'), bias folded into x and W inside the timed call, f32 forward at HIGHEST; "
         "xprof stubbed if missing (import only)",
))


# --- torch, torch.compile, Liger-Kernel, cut-cross-entropy ----------------------------------------


def torch_adapter(platform: str) -> Adapter:
    """Torch on the GPU (CPU when asked there): dlpack + copy in, synchronize, CUDA events."""
    import torch

    cuda = platform == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # IEEE f32 matmuls, as every f32 row of ours (Precision.HIGHEST); torch's default too.
    torch.backends.cuda.matmul.allow_tf32 = False

    def convert(a):
        try:
            t = torch.from_dlpack(a)
        except Exception:  # noqa: BLE001 -- a dtype or device dlpack cannot carry: through numpy
            host = np.asarray(a)
            t = torch.from_numpy(host.astype(np.float32) if host.dtype.kind == "V" or host.dtype.name == "bfloat16"
                                 else host)
            if str(getattr(a, "dtype", "")) == "bfloat16":
                t = t.to(torch.bfloat16)
        # A copy: Liger writes dlogits over its logits input, and the JAX arrays are shared.
        return t.to(device).clone()

    def prepare_grads(args, diff_argnums):
        args = list(args)
        for i in diff_argnums:
            args[i] = args[i].detach().requires_grad_(True)
        return args

    def vjp(f, args, diff_argnums, g):
        for i in diff_argnums:
            args[i].grad = None
        out = f(*args)
        # Our cotangent has the dtype of our output; a peer whose output differs (e.g. f32
        # losses from bf16 logits) gets it cast, as its user would have to.
        out.backward(g if g.dtype == out.dtype else g.to(out.dtype))
        return out, tuple(args[i].grad for i in diff_argnums)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def event_time(run):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    def cleanup():
        if cuda:
            torch.cuda.empty_cache()

    return Adapter(convert=convert, vjp=vjp, prepare_grads=prepare_grads, sync=sync,
                   to_numpy=lambda t: t.detach().float().cpu().numpy(), event_time=event_time if cuda else None,
                   cleanup=cleanup)


def _long_labels(args):
    args = list(args)
    args[1] = args[1].long()
    return args


def _torch_ops(compiled: bool) -> dict[str, Callable[[Any], ExternalOp]]:
    def wrap(make_fn, prepare=None):
        def build(case):
            fn = make_fn()
            if compiled:
                import torch

                fn = torch.compile(fn, dynamic=False)
            return ExternalOp(fn, prepare)

        return build

    def xent():
        import torch.nn.functional as F

        return lambda logits, labels: F.cross_entropy(logits, labels, reduction="none")

    def layer_norm():
        import torch.nn.functional as F

        return lambda x, scale, bias: F.layer_norm(x, (x.shape[-1],), scale, bias, eps=LAYER_NORM_EPS)

    def rms_norm():
        import torch.nn.functional as F

        return lambda x, scale: F.rms_norm(x, (x.shape[-1],), scale, eps=RMS_NORM_EPS)

    def dense_tanh():
        import torch

        return lambda x, w, b: torch.tanh(torch.addmm(b, x, w))

    def dense_gelu():
        import torch
        import torch.nn.functional as F

        return lambda x, w, b: F.gelu(torch.addmm(b, x, w), approximate="tanh")

    def dense():
        import torch

        return lambda x, w, b: torch.addmm(b, x, w)

    return {XENT: wrap(xent, _long_labels), XENT_PROB: wrap(xent), "layer_norm": wrap(layer_norm),
            "rms_norm": wrap(rms_norm), "dense_tanh": wrap(dense_tanh), "dense_gelu": wrap(dense_gelu),
            "dense": wrap(dense)}


def _torch_compile_ok(platform: str, named: bool) -> str | None:
    why = _torch_ok(platform, named)
    if why:
        return why
    import torch

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    return None


register(Peer(
    name="peer:torch",
    ops=_torch_ops(compiled=False),
    availability=_torch_ok,
    adapter=torch_adapter,
    note="torch.nn.functional eager: cross_entropy(reduction='none'), layer_norm, rms_norm, tanh(addmm), addmm",
))

register(Peer(
    name="peer:torch.compile",
    ops=_torch_ops(compiled=True),
    availability=_torch_compile_ok,
    adapter=torch_adapter,
    note="the peer:torch functions under torch.compile(dynamic=False); compile s = first call",
))


def _liger_xent(case):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return ExternalOp(lambda logits, labels: liger_cross_entropy(logits, labels, reduction="none"), _long_labels)


def _liger_layer_norm(case):
    from liger_kernel.transformers.functional import liger_layer_norm

    return ExternalOp(lambda x, scale, bias: liger_layer_norm(x, scale, bias, LAYER_NORM_EPS))


def _liger_rms_norm(case):
    from liger_kernel.transformers.functional import liger_rms_norm

    # casting_mode="gemma": everything in f32, one rounding at the end, as ours (the
    # default "llama" rounds x * rstd to x's dtype before the scale); in_place=False keeps
    # the cotangent intact for the next timed call.
    return ExternalOp(lambda x, scale: liger_rms_norm(x, scale, RMS_NORM_EPS, offset=0.0, casting_mode="gemma",
                                                      in_place=False))


def _lce_torch_prepare(fold_bias: bool) -> Callable[[list], list]:
    """``(x, w [D, V], b, labels)`` -> ``(x, c [V, D], b, int64 labels)``, once per input copy:
    the classifier in torch's ``[V, D]`` layout, outside the timed call. With ``fold_bias``
    (a peer without a bias) ``x' = [x, 1, 0..]`` and ``c' = [c, b, 0..]`` (see
    :func:`bias_fold_width`): ``x' c'^T = x w + b``; ``b`` stays in place, unused."""

    def prepare(args):
        x, w, b, labels = args
        c = w.t().contiguous()  # [V, D]
        if fold_bias:
            import torch

            (n, d), v = x.shape, c.shape[0]
            k = bias_fold_width(d)
            x = torch.cat([x, torch.ones((n, 1), dtype=x.dtype, device=x.device),
                           torch.zeros((n, k - 1), dtype=x.dtype, device=x.device)], dim=1)
            c = torch.cat([c, b.to(c.dtype)[:, None], torch.zeros((v, k - 1), dtype=c.dtype, device=c.device)], dim=1)
        return [x, c, b, labels.long()]

    return prepare


def _liger_defers_none_grads() -> bool:
    """Whether this Liger-Kernel computes ``reduction="none"``'s gradient in the backward with
    the per-row cotangent (linkedin/Liger-Kernel#1298, in 0.8.5): its forward then takes
    ``token_grad_output``. Before, the gradient made in the forward was scaled by ``g[0]``."""
    from liger_kernel.ops import fused_linear_cross_entropy as flce

    return "token_grad_output" in inspect.signature(flce.fused_linear_cross_entropy_forward).parameters


def _liger_lce(case):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if case.mode != "fwd" and not _liger_defers_none_grads():
        raise PeerSkip("this Liger-Kernel's fused linear cross-entropy with reduction='none' scales every row's "
                       "gradient by g[0] (fixed in 0.8.5, linkedin/Liger-Kernel#1298): only its reduced loss is "
                       "right, and the benchmark's contract is per-row losses")

    def lce(x, c, b, labels):
        return liger_fused_linear_cross_entropy(x, c, labels, bias=b, reduction="none")

    return ExternalOp(lce, _lce_torch_prepare(fold_bias=False))


register(Peer(
    name="peer:liger",
    ops={XENT: _liger_xent, "layer_norm": _liger_layer_norm, "rms_norm": _liger_rms_norm, LCE: _liger_lce},
    availability=_gpu_only("liger_kernel", "Liger-Kernel (Triton)"),
    adapter=torch_adapter,
    no_match={
        "liger_cross_entropy with probability labels": "Liger's cross-entropy takes integer labels only",
    },
    note="liger_cross_entropy(reduction='none') (dlogits computed in the forward, written over the logits), "
         "liger_layer_norm, liger_rms_norm(casting_mode='gemma', in_place=False), "
         "liger_fused_linear_cross_entropy(reduction='none', bias; weight [V, D] transposed "
         "once, untimed)",
))


def _cce_lce(case):
    if case.dtype != "bf16" and case.mode != "fwd":
        raise PeerSkip("cut-cross-entropy's backward takes bf16/fp16 embeddings only (an assert in "
                       "cce_backward.py)")
    from cut_cross_entropy import linear_cross_entropy

    def lce(e, c, b, labels):
        del b  # folded into e and c by the preparation
        return linear_cross_entropy(e, c, labels, reduction="none", filter_eps=None, impl="cce")

    return ExternalOp(lce, _lce_torch_prepare(fold_bias=True))


register(Peer(
    name="peer:cce",
    ops={LCE: _cce_lce},
    availability=_gpu_only("cut_cross_entropy", "cut-cross-entropy (Triton)"),
    adapter=torch_adapter,
    note="cut_cross_entropy.linear_cross_entropy(reduction='none', filter_eps=None, impl='cce'); classifier "
         "[V, D] and the bias folded into it and the embeddings once, untimed",
))


# --- checking a peer's forward -----------------------------------------------------------------------

# Largest |peer - reference| / max |reference| of the forward output that passes; beyond it
# the row is flagged (a peer called wrongly must not pass as a fast one).
CHECK_RTOL = {"f32": 1e-4, "bf16": 3e-2}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|`` in float64 (inf for a shape mismatch or NaN)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    if not np.isfinite(err):
        return float("inf")
    return err / scale if scale > 0 else err
