"""The benchmark's GPU-facing parts, checked on the CPU: device time read from a profiler
trace, the peers' plumbing (with fake peers), the tuning table and the block-size sweep.

The trace tests use a fabricated trace in the format jax 0.11.2's profiler writes
(``plugins/profile/<run>/<host>.trace.json.gz``; a GPU's kernels on ``Stream #`` threads of
a ``/device:GPU:0`` process), and the real profiler on this CPU (where there is no device).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedvjp.bench import __main__ as cli
from fusedvjp.bench import cases as cases_lib
from fusedvjp.bench import devtime, peers, sweep, timing
from fusedvjp.kernels import _common
from fusedvjp.kernels.dense import DenseBlockSizes
from fusedvjp.kernels.layer_norm import LayerNormBlockSizes

REPO = pathlib.Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"


# --- device time from a trace ---------------------------------------------------------------------


def _meta(pid, name, tid=None):
    e = {"ph": "M", "pid": pid, "name": "process_name" if tid is None else "thread_name", "args": {"name": name}}
    if tid is not None:
        e["tid"] = tid
    return e


def _x(pid, tid, ts, dur, name):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}


def gpu_trace() -> dict:
    """Two labels x two calls on the host; kernels on two CUDA streams (overlapping once), a
    derived 'XLA Ops' line that repeats them (must be ignored), and warm-up work before
    the first call (ignored)."""
    host, gpu = 701, 3
    events = [
        _meta(host, "/host:CPU"), _meta(host, "python", tid=11),
        _meta(gpu, "/device:GPU:0"), _meta(gpu, "Stream #13(Kernel,MemcpyD2D)", tid=13),
        _meta(gpu, "Stream #14(Kernel)", tid=14), _meta(gpu, "XLA Ops", tid=99),
        _x(gpu, 13, 5.0, 50.0, "warmup_kernel"),
        _x(host, 11, 100.0, 40.0, "fusedvjp_call|pallas|0"),
        _x(gpu, 13, 110.0, 10.0, "fusedvjp_dense_fwd"), _x(gpu, 13, 125.0, 5.0, "fusedvjp_dense_bwd_dx"),
        _x(gpu, 99, 110.0, 20.0, "fusion.1"),
        _x(host, 11, 200.0, 40.0, "fusedvjp_call|pallas|1"),
        _x(gpu, 13, 210.0, 10.0, "fusedvjp_dense_fwd"), _x(gpu, 14, 215.0, 10.0, "fusedvjp_dense_bwd_dx"),
        _x(host, 11, 300.0, 30.0, "fusedvjp_call|xla|0"),
        _x(gpu, 13, 305.0, 2.0, "loop_fusion"),
        _x(host, 11, 400.0, 30.0, "fusedvjp_call|xla|1"),  # launched nothing
        _x(host, 11, 90.0, 400.0, "PjitFunction(f)"),  # other host events do not open windows
    ]
    return {"displayTimeUnit": "ns", "metadata": {"highres-ticks": True}, "traceEvents": events}


def test_parse_trace_per_call_device_time():
    calls = devtime.parse_trace(gpu_trace())
    assert set(calls) == {"pallas", "xla"}
    p0, p1 = calls["pallas"]
    assert (p0.busy_us, p0.span_us, p0.events) == (15.0, 20.0, 2)  # the derived XLA Ops line is not counted
    assert (p1.busy_us, p1.span_us, p1.events) == (15.0, 15.0, 2)  # two streams overlap: union, not sum
    x0, x1 = calls["xla"]
    assert (x0.busy_us, x0.events) == (2.0, 1)
    assert (x1.busy_us, x1.span_us, x1.events) == (0.0, 0.0, 0)
    s = devtime.summarize(calls["pallas"])
    assert s["device_ms"] == pytest.approx(0.015) and s["device_kernels"] == 2
    assert s["device_span_ms"] == pytest.approx(0.0175)
    assert devtime.summarize([devtime.CallDevice(0.0, 0.0, 0)]) is None


def test_parse_trace_tpu_lane_and_no_device():
    events = [_meta(1, "/host:CPU"), _meta(1, "python", tid=1), _meta(2, "/device:TPU:0"),
              _meta(2, "XLA Ops", tid=5), _meta(2, "XLA Modules", tid=6),
              _x(1, 1, 0.0, 100.0, "fusedvjp_call|pallas|0"), _x(2, 5, 10.0, 30.0, "fusedvjp_xent_fwd"),
              _x(2, 6, 10.0, 40.0, "jit_f")]
    (call,) = devtime.parse_trace({"traceEvents": events})["pallas"]
    assert (call.busy_us, call.events) == (30.0, 1)
    host_only = [e for e in events if e["pid"] == 1]
    assert devtime.parse_trace({"traceEvents": host_only}) == {"pallas": [None]}
    assert devtime.summarize([None, None]) is None


def test_read_trace_dir_finds_the_recorded_file(tmp_path):
    run = tmp_path / "plugins" / "profile" / "2026_11_28_03_21_45"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump(gpu_trace(), f)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": []}, f)  # the metadata-free copy must not be the one read
    calls = devtime.parse_trace(devtime.read_trace_dir(tmp_path))
    assert [c.events for c in calls["pallas"]] == [2, 2]
    with pytest.raises(FileNotFoundError):
        devtime.read_trace_dir(tmp_path / "nothing")


def test_profile_calls_with_the_real_profiler_on_cpu():
    """jax.profiler writes its trace, the annotations are found, and a CPU has no device lane."""
    f = jax.jit(lambda a: jnp.tanh(a @ a))
    x = jnp.ones((32, 32))
    f(x).block_until_ready()
    seen = []
    calls = devtime.profile_calls({"a": lambda i: seen.append(f(x).block_until_ready()),
                                   "b": lambda i: f(x).block_until_ready()}, 3)
    assert calls == {"a": [None, None, None], "b": [None, None, None]} and len(seen) == 3


def test_looped_runs_the_op_n_times_in_one_dispatch():
    calls = []

    def f(a, b):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.tanh(a @ b), a.sum()

    a, b = jnp.full((4, 4), 0.1), jnp.eye(4)
    out = jax.jit(timing.looped(f, 5))(a, b)
    jax.effects_barrier()
    np.testing.assert_allclose(out[0], np.tanh(np.full((4, 4), 0.1)), rtol=1e-6)
    assert len(calls) == 5, "every iteration must run (none hoisted out of the loop)"


# --- peers ------------------------------------------------------------------------------------------


def _numpy_adapter(platform):
    """A stand-in framework: numpy on the host (exercises the non-JAX path without torch)."""
    def vjp(f, args, diff, g):
        return f(*args), tuple(np.zeros_like(args[i]) for i in diff)

    return peers.Adapter(convert=lambda a: np.asarray(a, np.float64), vjp=vjp,
                         prepare_grads=lambda args, diff: list(args), sync=lambda: None, to_numpy=np.asarray)


def _np_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * scale + bias


def _decline(case):
    raise peers.PeerSkip("declines every case (test)")


@pytest.fixture
def fake_peers(monkeypatch):
    from fusedvjp.ops import registry

    fakes = [
        peers.Peer("peer:fake-jax", {"layer_norm": lambda case: registry.get("layer_norm").reference},
                   availability=lambda platform, named: None, no_match={"fake.fused_thing": "not ours (test)"},
                   note="jnp reference (test)"),
        peers.Peer("peer:fake-np", {"layer_norm": lambda case: peers.ExternalOp(_np_layer_norm)},
                   availability=lambda platform, named: None, adapter=_numpy_adapter),
        peers.Peer("peer:fake-wrong", {"layer_norm": lambda case: peers.ExternalOp(lambda x, s, b: 2 * x)},
                   availability=lambda platform, named: None, adapter=_numpy_adapter),
        peers.Peer("peer:fake-declines", {"layer_norm": _decline}, availability=lambda platform, named: None),
        peers.Peer("peer:fake-absent", {"layer_norm": _decline},
                   availability=lambda platform, named: "fakelib not importable (test)"),
    ]
    for peer in fakes:
        monkeypatch.setitem(peers.PEERS, peer.name, peer)
    return fakes


def test_named_peers_run_beside_ours_on_the_same_inputs(fake_peers, tmp_path):
    names = ",".join(p.short for p in fake_peers)
    doc = cli.main(["--quick", "--ops", "layer_norm,dense", "--shapes", "mnist", "--dtypes", "f32", "--impls", "xla",
                    "--peers", names, "--out", str(tmp_path)])
    rows = {(r["impl"], r["mode"]): r for r in doc["results"] if r["op"] == "layer_norm"}
    for mode in ("fwd", "fwd+bwd"):
        xla = rows[("xla", mode)]
        for impl in ("peer:fake-jax", "peer:fake-np", "peer:fake-wrong"):
            r = rows[(impl, mode)]
            assert r["median_ms"] > 0 and (r["bytes"], r["flops"]) == (xla["bytes"], xla["flops"])
            assert r["speedup"] == pytest.approx(xla["median_ms"] / r["median_ms"])  # --impls xla: the baseline
            assert r["device_ms"] is None and r["device_note"] == "n/a (CPU)"
        assert rows[("peer:fake-jax", mode)]["check"] == "ok" and rows[("peer:fake-np", mode)]["check"] == "ok"
        assert rows[("peer:fake-wrong", mode)]["check"].startswith("FAILED")
        assert rows[("peer:fake-np", mode)]["peak_temp_bytes"] is None
    assert not any(r["impl"].startswith("peer:") for r in doc["results"] if r["op"] == "dense")
    record = doc["peers"]
    assert record["ran"]["peer:fake-jax"] == ["layer_norm"] and record["not_covered"]["peer:fake-jax"] == ["dense"]
    skipped = {(s["peer"], s.get("op")): s for s in record["skipped"]}
    assert skipped[("peer:fake-absent", None)]["reason"] == "fakelib not importable (test)"
    assert skipped[("peer:fake-jax", "fake.fused_thing")]["reason"] == "not ours (test)"
    declined = [s for s in record["skipped"] if s["peer"] == "peer:fake-declines"]
    assert len(declined) == 2 and all(s["reason"] == "declines every case (test)" for s in declined)
    md = (tmp_path / "results.md").read_text()
    assert "## Peers" in md and "fakelib not importable (test)" in md and "Forward checks that FAILED" in md
    assert "peer:fake-wrong" in md.split("Forward checks that FAILED")[1]
    assert "| peer:fake-wrong! |" in md and "| peer:fake-np |" in md
    assert json.loads((tmp_path / "results.json").read_text())["peers"] == json.loads(json.dumps(record))


def test_auto_peers_skip_on_a_cpu_and_unknown_ones_are_refused(monkeypatch):
    running, record = peers.select("auto", "cpu", ["layer_norm"])
    assert running == [] and {s["peer"] for s in record["skipped"]} == set(peers.PEERS)
    assert all("not a GPU" in s["reason"] for s in record["skipped"])
    assert peers.select("none", "gpu", ["layer_norm"]) == ([], {"requested": "none", "ran": {}, "skipped": [],
                                                                "not_covered": {}})
    with pytest.raises(SystemExit):
        cli.parse_args(["--peers", "torch,nope"])


def test_gpu_peers_say_why_not_on_a_cpu():
    for name in ("tokamax", "liger", "cce"):
        (peer,) = peers.resolve([name])
        assert "GPU" in peer.availability("cpu", True)
    why = peers.PEERS["peer:torch"].availability("cpu", True)
    try:
        import torch  # noqa: F401
    except ImportError:
        assert why.startswith("torch not importable")
    else:
        assert why is None


def test_tokamax_import_stubs_xprof_only(monkeypatch):
    stubs = ("xprof", "xprof.cli", "xprof.cli.tools")
    if any(name in sys.modules for name in stubs):
        pytest.skip("xprof already imported")
    attempts = []

    def fake_import(name):
        attempts.append(name)
        if len(attempts) == 1:
            raise ModuleNotFoundError("No module named 'xprof'", name="xprof")
        return sys.modules["xprof.cli.tools"]

    monkeypatch.setattr(peers.importlib, "import_module", fake_import)
    try:
        tools = peers.import_tokamax()
        assert attempts == ["tokamax", "tokamax"]
        with pytest.raises(RuntimeError, match="stub"):
            tools.get_kernel_stats_tool()
    finally:
        for name in stubs:
            sys.modules.pop(name, None)

    def missing(name):
        raise ModuleNotFoundError("No module named 'tokamax'", name="tokamax")

    monkeypatch.setattr(peers.importlib, "import_module", missing)
    with pytest.raises(ModuleNotFoundError):
        peers.import_tokamax()
    assert not any(name in sys.modules for name in stubs)


def test_relative_error():
    want = np.array([1.0, -2.0, 4.0])
    assert peers.relative_error(want, want) == 0
    assert peers.relative_error(want + [0, 0, 0.4], want) == pytest.approx(0.1)
    assert peers.relative_error(want[:2], want) == np.inf
    assert peers.relative_error(np.array([np.nan, 0, 0]), want) == np.inf


# --- the linear cross-entropy peers (tokamax, Liger, CCE), with fake libraries --------------------


class _FakeTensor(np.ndarray):
    """The few torch.Tensor methods the linear cross-entropy peers' preparation uses."""

    device = "cpu"

    def t(self):
        return self.T

    def contiguous(self):
        return np.ascontiguousarray(self).view(_FakeTensor)

    def long(self):
        return self.astype(np.int64)

    def to(self, dtype):
        return self.astype(dtype)


def _fake_torch():
    torch = type(sys)("torch")
    torch.cat = lambda ts, dim: np.concatenate(ts, axis=dim).view(_FakeTensor)
    torch.ones = lambda shape, dtype, device: np.ones(shape, dtype).view(_FakeTensor)
    torch.zeros = lambda shape, dtype, device: np.zeros(shape, dtype).view(_FakeTensor)
    return torch


def _fake_tensor_adapter(platform):
    def vjp(f, args, diff, g):
        return f(*args), tuple(np.zeros_like(args[i]) for i in diff)

    return peers.Adapter(convert=lambda a: np.asarray(a).view(_FakeTensor), vjp=vjp,
                         prepare_grads=lambda args, diff: list(args), sync=lambda: None, to_numpy=np.asarray)


def _np_xent(z, labels):
    z = np.asarray(z, np.float64)
    top = z.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0]
    return lse - z[np.arange(len(z)), np.asarray(labels)]


@pytest.fixture
def fake_lce_libraries(monkeypatch):
    """Fake tokamax, liger_kernel, cut_cross_entropy (and torch's cat/ones/zeros): each records
    how it was called and computes the plain loss of what it was given, so a wrong layout or
    bias fold fails the benchmark's forward check. The real peers run with them on the CPU."""
    calls = {"tokamax": [], "liger": [], "cce": []}

    def tokamax_lce(x, labels, weights, *, reduction="sum", precision=None, implementation=None):
        assert precision is None
        calls["tokamax"].append(dict(x=x.shape, w=weights.shape, dtype=str(x.dtype), reduction=reduction,
                                     implementation=implementation, precision=jax.config.jax_default_matmul_precision))
        z = jnp.dot(x, weights, preferred_element_type=jnp.float32)
        return (jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, labels[:, None], -1)[:, 0]).astype(x.dtype)

    def liger_lce(input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                  label_smoothing=0.0, reduction="mean", softcap=None, **kwargs):
        calls["liger"].append(dict(x=input.shape, w=weight.shape, w_id=id(weight),
                                   c_contiguous=weight.flags.c_contiguous, bias=None if bias is None else bias.shape,
                                   labels=str(target.dtype), reduction=reduction))
        return _np_xent(np.asarray(input, np.float64) @ np.asarray(weight, np.float64).T + np.asarray(bias, np.float64),
                        target)

    def liger_forward(_input, weight, target, bias=None, token_grad_output=None, **kwargs):
        raise AssertionError("only its signature is read")

    def cce_lce(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False, filter_eps="high",
                impl="cce"):
        calls["cce"].append(dict(x=e.shape, w=c.shape, c_contiguous=c.flags.c_contiguous, labels=str(targets.dtype),
                                 reduction=reduction, filter_eps=filter_eps, impl=impl))
        return _np_xent(np.asarray(e, np.float64) @ np.asarray(c, np.float64).T, targets)

    modules = {name: type(sys)(name) for name in (
        "liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.functional", "liger_kernel.ops",
        "liger_kernel.ops.fused_linear_cross_entropy", "cut_cross_entropy")}
    modules["liger_kernel.transformers.functional"].liger_fused_linear_cross_entropy = liger_lce
    modules["liger_kernel.ops.fused_linear_cross_entropy"].fused_linear_cross_entropy_forward = liger_forward
    modules["liger_kernel.ops"].fused_linear_cross_entropy = modules["liger_kernel.ops.fused_linear_cross_entropy"]
    modules["cut_cross_entropy"].linear_cross_entropy = cce_lce
    modules["torch"] = _fake_torch()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    # The quick shapes' V (10) is no multiple of tokamax's block: let the fake serve it.
    monkeypatch.setattr(peers, "TOKAMAX_CHUNKED_V_BLOCK", 5)
    monkeypatch.setattr(peers, "import_tokamax", lambda: types.SimpleNamespace(
        linear_softmax_cross_entropy_loss=tokamax_lce))
    for name in ("peer:tokamax", "peer:liger", "peer:cce"):
        peer = peers.PEERS[name]
        adapter = None if peer.adapter is None else _fake_tensor_adapter
        monkeypatch.setitem(peers.PEERS, name, dataclasses.replace(peer, availability=lambda platform, named: None,
                                                                   adapter=adapter))
    return calls


def test_linear_cross_entropy_peers_layout_reduction_and_skips(fake_lce_libraries, tmp_path):
    calls = fake_lce_libraries
    doc = cli.main(["--quick", "--ops", peers.LCE, "--shapes", "mnist", "--dtypes", "f32,bf16", "--impls", "xla",
                    "--peers", "tokamax,liger,cce", "--out", str(tmp_path)])
    rows = {(r["impl"], r["dtype"], r["mode"]): r for r in doc["results"]}
    n, d, v = rows[("xla", "f32", "fwd")]["shape"]
    d1 = d + peers.bias_fold_width(d)
    assert d1 % 8 == 0 and d < d1 <= d + 8
    ran = {("peer:tokamax", "f32", "fwd"), ("peer:liger", "f32", "fwd"), ("peer:liger", "f32", "fwd+bwd"),
           ("peer:cce", "f32", "fwd")} | {(p, "bf16", m) for p in ("peer:tokamax", "peer:liger", "peer:cce")
                                         for m in ("fwd", "fwd+bwd")}
    assert {k for k in rows if k[0].startswith("peer:")} == ran
    # The fakes compute the plain loss of what they were given: "ok" means layout and bias fold are right.
    assert all(rows[k]["check"] == "ok" for k in ran), {k: rows[k].get("check", rows[k].get("error")) for k in ran}
    skipped = {s["peer"]: (s["case"], s["reason"]) for s in doc["peers"]["skipped"] if s.get("op") == peers.LCE}
    f32_bwd = f"{cases_lib.short_name(peers.LCE)}-{n}x{d}x{v}-f32-fwd+bwd"
    assert set(skipped) == {"peer:tokamax", "peer:cce"} and {c for c, _ in skipped.values()} == {f32_bwd}
    assert "precision" in skipped["peer:tokamax"][1] and "bf16/fp16" in skipped["peer:cce"][1]
    # tokamax: [D', V] weights with the bias folded in, per-row losses, its memory-bounded impl; HIGHEST for f32.
    assert {(c["x"], c["w"], c["reduction"], c["implementation"]) for c in calls["tokamax"]} == {
        ((n, d1), (d1, v), "none", "chunked_xla")}
    assert {(c["dtype"], c["precision"]) for c in calls["tokamax"]} == {("float32", "highest"), ("bfloat16", None)}
    # Liger: [V, D] weights, transposed once per input copy (4 cases x at most 2 copies in --quick), its own bias.
    assert {(c["x"], c["w"], c["bias"], c["reduction"], c["labels"], c["c_contiguous"]) for c in calls["liger"]} == {
        ((n, d), (v, d), (v,), "none", "int64", True)}
    assert len({c["w_id"] for c in calls["liger"]}) <= 4 * 2 < len(calls["liger"])
    # CCE: [V, D'] classifier with the bias folded in, exact gradients, per-row losses.
    assert {(c["x"], c["w"], c["reduction"], c["filter_eps"], c["impl"], c["labels"], c["c_contiguous"])
            for c in calls["cce"]} == {((n, d1), (v, d1), "none", None, "cce", "int64", True)}


def test_an_old_liger_skips_the_linear_cross_entropy_backward(fake_lce_libraries, monkeypatch):
    def old_forward(_input, weight, target, bias=None, reduction="mean"):
        raise AssertionError("only its signature is read")

    monkeypatch.setattr(sys.modules["liger_kernel.ops.fused_linear_cross_entropy"],
                        "fused_linear_cross_entropy_forward", old_forward)
    build = peers.PEERS["peer:liger"].ops[peers.LCE]
    with pytest.raises(peers.PeerSkip, match=r"g\[0\].*#1298"):
        build(cases_lib.Case(peers.LCE, (8, 16, 10), "bf16", "fwd+bwd"))
    assert isinstance(build(cases_lib.Case(peers.LCE, (8, 16, 10), "bf16", "fwd")), peers.ExternalOp)


def test_tokamax_skips_a_vocabulary_its_chunks_pad_unmasked():
    build = peers.PEERS["peer:tokamax"].ops[peers.LCE]
    for v in (10, 128256):
        with pytest.raises(peers.PeerSkip, match=f"pads V = {v} to a multiple of 2048"):
            build(cases_lib.Case(peers.LCE, (8, 16, v), "bf16", "fwd"))


# --- the tuning table ------------------------------------------------------------------------------


def _table(tmp_path, monkeypatch, entries) -> pathlib.Path:
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"schema": 1, "entries": entries}))
    monkeypatch.setenv(_common.TUNING_ENV, str(path))
    return path


def test_default_reads_the_table_first(tmp_path, monkeypatch):
    heuristic = DenseBlockSizes.default(128, 512, 784, jnp.float32, "triton")
    tuned = {"block_m": 32, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 2}
    key = _common.tuning_key("dense_fwd", (128, 512, 784), jnp.float32, "triton")
    assert key == "dense_fwd/triton/float32/128x512x1024"
    _table(tmp_path, monkeypatch, {"cpu": {key: {"config": tuned, "evidence": {"ms": 1.0}}}})
    assert dataclasses.asdict(DenseBlockSizes.default(128, 512, 784, jnp.float32, "triton")) == tuned
    assert DenseBlockSizes.default(100, 300, 700, jnp.float32, "triton") == DenseBlockSizes(**tuned), "same bucket"
    assert DenseBlockSizes.default(128, 512, 784, jnp.bfloat16, "triton") != DenseBlockSizes(**tuned)
    # Each dense kernel has its own key: the dx kernel's tiles are not the forward's.
    assert DenseBlockSizes.default(128, 512, 784, jnp.float32, "triton", "dx") != DenseBlockSizes(**tuned)
    with _common.tuning_session({("dense_fwd", "triton"): None}) as session:  # the sweep's bypass
        assert DenseBlockSizes.default(128, 512, 784, jnp.float32, "triton") == heuristic
    assert session.lookups[0]["source"] == "heuristic" and session.lookups[0]["key"] == key
    monkeypatch.delenv(_common.TUNING_ENV)
    assert DenseBlockSizes.default(128, 512, 784, jnp.float32, "triton") == heuristic


def test_an_entry_this_case_cannot_use_is_a_miss(tmp_path, monkeypatch):
    # TPU: block_rows must be N or a multiple of 8 no larger than N; 12 rows share the bucket of 16.
    key = _common.tuning_key("layer_norm", (12, 1000), jnp.float32, "mosaic_tpu")
    _table(tmp_path, monkeypatch, {"cpu": {key: {"config": {"block_rows": 16, "block_cols": 1000}, "evidence": {}}}})
    assert LayerNormBlockSizes.default(16, 1000, jnp.float32, "mosaic_tpu").block_rows == 16
    assert LayerNormBlockSizes.default(12, 1000, jnp.float32, "mosaic_tpu").block_rows == 12  # the heuristic


def test_a_malformed_table_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"entries": [1, 2]}))
    monkeypatch.setenv(_common.TUNING_ENV, str(path))
    with pytest.raises(ValueError, match="bad.json"):
        DenseBlockSizes.default(8, 8, 8, jnp.float32, "triton")


def test_lowering_for_an_h100_uses_the_h100_entry(tmp_path, monkeypatch):
    case = cases_lib.Case("softmax_cross_entropy_with_integer_labels", (128, 10), "f32", "fwd+bwd")
    bucket = sweep.probe(case)
    tuned = dataclasses.replace(bucket.heuristic, num_warps=2, block_n=64)
    _table(tmp_path, monkeypatch, {H100: {bucket.key: {"config": dataclasses.asdict(tuned), "evidence": {}}}})
    with _common.tuning_session() as session:
        jax.clear_caches()
        sweep._lower_for_h100(case.function("pallas"), sweep._abstract_inputs(case))
    triton = [lk for lk in session.lookups if lk["backend"] == "triton" and lk["device_kind"] == H100]
    assert triton and all(lk["source"] == "table" and lk["config"] == dataclasses.asdict(tuned) for lk in triton)


def test_the_packaged_table_is_valid():
    doc = json.loads(_common.TUNING_FILE.read_text())
    classes = {k.name: k.cls for k in sweep.KERNELS}
    assert isinstance(doc["entries"], dict)
    for device, entries in doc["entries"].items():
        for key, entry in entries.items():
            kernel, backend, dtype, bucket = key.split("/")
            classes[kernel](**entry["config"])
            assert backend in _common.BACKEND_NAMES and jnp.dtype(dtype) and bucket
            assert {"op", "shape", "metric", "ms"} <= set(entry["evidence"]), (device, key)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"fusedvjp.kernels" = ["tuning.json"]' in pyproject, "the table ships with the package"


# --- the sweep ----------------------------------------------------------------------------------------


def test_probe_and_neighbours():
    case = cases_lib.Case("dense", (128, 512, 10), "f32", "fwd+bwd")
    bucket = sweep.probe(case)
    assert bucket.key == "dense_fwd/triton/float32/128x16x512" and bucket.dims == (128, 10, 512)
    dw_bucket = sweep.probe(case, sweep.KERNELS_OF_OP["dense"][2])
    assert dw_bucket.key == "dense_dw/triton/float32/128x16x512" and dw_bucket.heuristic.block_m == 16
    cands = sweep.neighbours(bucket)
    assert cands[0] == bucket.heuristic and len(cands) == len(set(cands)) > 3
    base = dataclasses.asdict(bucket.heuristic)
    for c in cands[1:]:
        diff = [f for f, v in dataclasses.asdict(c).items() if v != base[f]]
        assert len(diff) == 1, "one field one step"
        assert c.block_n <= 16, "no tile past the dimension's power of two"
    assert sweep.check_legal(bucket, cands[0]) is None
    too_big = DenseBlockSizes(256, 256, 128, num_warps=8, num_stages=4)
    assert "shared memory" in sweep.check_legal(dataclasses.replace(bucket, case=cases_lib.Case(
        "dense_tanh", (8192, 4096, 4096), "bf16", "fwd+bwd")), too_big)


def test_choose_keeps_the_heuristic_unless_the_gain_is_real():
    heuristic = {"block_n": 1}
    record = {"op": "x", "shape": [1], "dtype": "f32", "results": [
        {"config": heuristic, "median_ms": 1.0, "device_ms": 0.100},
        {"config": {"block_n": 2}, "median_ms": 0.9, "device_ms": 0.099},
        {"config": {"block_n": 4}, "error": "boom"}]}
    entry = sweep.choose(record, heuristic)
    assert entry["config"] == heuristic and entry["evidence"]["kept_heuristic"]
    assert entry["evidence"]["metric"] == "device_ms" and entry["evidence"]["candidates_failed"] == 1
    record["results"][1]["device_ms"] = 0.05
    entry = sweep.choose(record, heuristic)
    assert entry["config"] == {"block_n": 2} and entry["evidence"]["best_gain"] == pytest.approx(0.5)
    del record["results"][0]["device_ms"]  # not every row traced: wall clock decides
    assert sweep.choose(record, heuristic)["evidence"]["metric"] == "median_ms"
    assert sweep.choose({**record, "results": [record["results"][2]]}, heuristic) is None


def test_committed_candidates_cover_the_benchmark():
    doc = json.loads(sweep.CANDIDATES_FILE.read_text())
    target = doc["targets"]["h100"]
    classes = {k.name: k.cls for k in sweep.KERNELS}
    current = sweep.buckets()
    missing = [b.key for b in current if b.key not in target]
    assert not missing, f"regenerate bench/sweep_candidates.json (python -m fusedvjp.bench.sweep --write-candidates): {missing}"
    for key, entry in target.items():
        assert entry["candidates"], key
        for c in entry["candidates"]:
            classes[key.split("/")[0]](**c["config"])
    bucket = current[0]
    got = sweep.committed_candidates(bucket, H100)
    assert got and all(isinstance(c, bucket.kernel.cls) for c in got)
    assert sweep.committed_candidates(bucket, "cpu") is None
