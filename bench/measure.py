"""Timing one benchmark case: each impl and each peer, on the same inputs, three ways.

* ``median_ms`` (p20/p80): wall clock per call on the host, each call ended by
  ``block_until_ready`` (torch: ``torch.cuda.synchronize``) -- what a caller waits for,
  dispatch included.
* ``device_ms`` (p20/p80, span, kernels per call): what the device spent, from a profiler
  trace of the same calls (:mod:`fusedvjp.bench.devtime`); torch rows whose kernels the
  trace missed fall back to CUDA events (``device_source``). None on a CPU: "n/a (CPU)".
* ``loop_ms``: for launch-bound rows (wall median under :data:`LAUNCH_BOUND_MS`), the op
  run ``loop_n`` times inside one jitted ``lax.fori_loop``, per iteration: dispatch
  amortized (JAX rows only).

Every row also gets the roofline figures of its wall time and of its device time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fusedvjp.bench import cases as cases_lib
from fusedvjp.bench import devtime, peers as peers_lib, roofline, timing

QUICK_ITERS = 5
# Rows whose wall median is under this are dominated by dispatch: they get the loop time.
LAUNCH_BOUND_MS = 0.2
LOOP_N = 100
QUICK_LOOP_N = 2
# Calls per row under the profiler.
PROFILED_CALLS = 20
QUICK_PROFILED_CALLS = 3
CPU_DEVICE_NOTE = "n/a (CPU)"

KEYS = ("op", "shape", "dtype", "mode", "impl", "median_ms", "device_ms", "p20_ms", "p80_ms", "compile_s", "bytes",
        "flops", "peak_temp_bytes")


@dataclasses.dataclass(frozen=True)
class Options:
    """How to measure.

    Attributes:
      quick: few calls, two input copies, a 2-iteration loop.
      seed: seed of the random inputs (the same for every impl and peer).
      platform: ``"gpu"``, ``"tpu"`` or ``"cpu"``.
      device_time: run the profiled pass (off on a CPU: there is no device to trace).
      loop_n: iterations of the loop time (0: none).
      peers: the peers to run where they have the case's op.
    """

    quick: bool
    seed: int
    platform: str
    device_time: bool
    loop_n: int
    peers: Sequence[peers_lib.Peer] = ()


def error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def ordered(row: dict) -> dict:
    return {**{k: row.get(k) for k in KEYS}, **{k: v for k, v in row.items() if k not in KEYS}}


def error_row(base: dict, impl: str, e: BaseException) -> dict:
    return ordered({**base, "impl": impl, "median_ms": None, "device_ms": None, "p20_ms": None, "p80_ms": None,
                    "compile_s": None, "peak_temp_bytes": 0, "error": error_text(e)})


@dataclasses.dataclass
class _Timed:
    """One row being measured: its row dict and how to run call ``i`` again (blocking)."""

    row: dict
    run: Callable[[int], Any]
    event_time: Callable[[int], float] | None = None


def _iters(quick: bool) -> dict:
    return dict(warmup=1, min_iters=QUICK_ITERS, max_iters=QUICK_ITERS) if quick else {}


def _time_jax(base: dict, label: str, fn, inputs, opts: Options) -> _Timed:
    """Compile, wall-time and (launch-bound) loop-time one JAX function of the case's inputs."""
    compiled = timing.compile_fn(fn, inputs[0])
    stats = timing.summarize(timing.time_calls(compiled.fn, inputs, **_iters(opts.quick)))
    row = {**base, "impl": label, "median_ms": stats.median * 1e3, "p20_ms": stats.p20 * 1e3,
           "p80_ms": stats.p80 * 1e3, "compile_s": compiled.compile_s, "peak_temp_bytes": compiled.peak_temp_bytes,
           "n_calls": stats.n, "input_copies": len(inputs)}
    if opts.loop_n and row["median_ms"] < LAUNCH_BOUND_MS:
        row.update(_loop_time(fn, inputs[0], opts))
    return _Timed(row, lambda i: jax.block_until_ready(compiled.fn(*inputs[i % len(inputs)])))


def _loop_time(fn, args, opts: Options) -> dict:
    n = QUICK_LOOP_N if opts.quick else opts.loop_n
    try:
        compiled = timing.compile_fn(timing.looped(fn, n), args)
        iters = dict(warmup=1, min_iters=3, max_iters=3) if opts.quick else dict(min_iters=10, max_iters=50)
        stats = timing.summarize(timing.time_calls(compiled.fn, [args], **iters))
    except Exception as e:  # noqa: BLE001 -- the row keeps its other numbers
        return {"loop_error": error_text(e)}
    return {"loop_ms": stats.median * 1e3 / n, "loop_n": n}


def _time_external(base: dict, peer: peers_lib.Peer, op: peers_lib.ExternalOp, case: cases_lib.Case, inputs,
                   opts: Options) -> _Timed:
    """Converts the inputs for a non-JAX peer once per copy, then times it like ours."""
    adapter = peer.adapter(opts.platform)
    diff = case.spec.diff_argnums
    states = []
    for arrays in inputs:
        converted = [adapter.convert(a) for a in arrays]
        args, g = (converted, None) if case.mode == "fwd" else (converted[:-1], converted[-1])
        if op.prepare is not None:
            args = op.prepare(args)
        if case.mode != "fwd":
            args = adapter.prepare_grads(args, diff)
        states.append((args, g))

    def call(state):
        args, g = state
        return op.fn(*args) if case.mode == "fwd" else adapter.vjp(op.fn, args, diff, g)

    start = time.perf_counter()
    first = call(states[0])  # torch.compile compiles here
    adapter.sync()
    compile_s = time.perf_counter() - start
    times = timing.time_calls(call, [(s,) for s in states], sync=lambda _: adapter.sync(), **_iters(opts.quick))
    stats = timing.summarize(times)
    row = {**base, "impl": peer.name, "median_ms": stats.median * 1e3, "p20_ms": stats.p20 * 1e3,
           "p80_ms": stats.p80 * 1e3, "compile_s": compile_s, "peak_temp_bytes": None, "n_calls": stats.n,
           "input_copies": len(inputs), "peer_note": peer.note,
           "_out": adapter.to_numpy(first if case.mode == "fwd" else first[0])}

    def run(i):
        call(states[i % len(states)])
        adapter.sync()

    event_time = None
    if adapter.event_time is not None:
        event_time = lambda i: adapter.event_time(lambda: call(states[i % len(states)]))  # noqa: E731
    return _Timed(row, run, event_time)


def _reference_out(case: cases_lib.Case, inputs) -> np.ndarray:
    args = inputs[0] if case.mode == "fwd" else inputs[0][:-1]
    return np.asarray(jax.jit(case.spec.reference)(*args), np.float64)


def measure_case(case: cases_lib.Case, impls: Sequence[str], roof: roofline.Roofline, opts: Options,
                 log=print) -> tuple[list[dict], list[dict]]:
    """Times ``case`` for each impl and each peer that has its op.

    A failure becomes that row's ``error`` (timings null); a peer that does not serve the
    case (:class:`~fusedvjp.bench.peers.PeerSkip`) is reported as skipped, not as a row.

    Returns:
      (rows in order: impls, then peers; skipped peers ``[{peer, op, case, reason}]``).
    """
    base = {"op": case.op, "shape": list(case.shape), "dtype": case.dtype, "mode": case.mode,
            "bytes": case.bytes(), "flops": case.flops()}
    skipped: list[dict] = []
    try:
        inputs = case.input_copies(opts.seed, max_copies=2 if opts.quick else cases_lib.MAX_COPIES)
    except Exception as e:  # noqa: BLE001 -- recorded in the rows, the run goes on
        return [error_row(base, impl, e) for impl in impls], skipped
    rows: list[dict] = []
    timed: list[_Timed] = []

    def add(label: str, measure: Callable[[], _Timed]):
        try:
            t = measure()
        except peers_lib.PeerSkip as e:
            skipped.append({"peer": label, "op": case.op, "case": case.label, "reason": str(e)})
            log(f"  {label:<6} skipped: {e}")
            return
        except Exception as e:  # noqa: BLE001 -- recorded in the row, the run goes on
            rows.append(error_row(base, label, e))
            log(f"  {label:<6} error: {rows[-1]['error']}")
            return
        rows.append(t.row)
        timed.append(t)
        loop = f", loop {t.row['loop_ms']:.4g} ms" if t.row.get("loop_ms") else ""
        log(f"  {label:<6} {t.row['median_ms']:.4g} ms (compile {t.row['compile_s']:.2f} s, {t.row['n_calls']} calls"
            f"{loop})")

    for impl in (i for i in impls if case.has_impl(i)):
        add(impl, lambda impl=impl: _time_jax(base, impl, case.function(impl), inputs, opts))
    cleanups = []
    for peer in (p for p in opts.peers if case.op in p.ops):
        def measure(peer=peer):
            built = peer.ops[case.op](case)
            if peer.adapter is None:
                t = _time_jax(base, peer.name, case.wrap(built), inputs, opts)
                t.row["peer_note"] = peer.note
                out = jax.block_until_ready(built(*(inputs[0] if case.mode == "fwd" else inputs[0][:-1])))
                t.row["_out"] = np.asarray(out, np.float64)
                return t
            cleanups.append(peer.adapter)
            return _time_external(base, peer, built, case, inputs, opts)

        add(peer.name, measure)
    _check_peers(case, inputs, rows)
    _device_times(timed, opts, log)
    for row in rows:
        if row.get("median_ms"):
            row.update(roofline.row_metrics(row["bytes"], row["flops"], case.dtype, row["median_ms"] * 1e-3, roof))
            if row.get("device_ms"):
                dev = roofline.row_metrics(row["bytes"], row["flops"], case.dtype, row["device_ms"] * 1e-3, roof)
                row["device_pct_of_roofline"] = dev["pct_of_roofline"]
    timed.clear()  # the peers' converted inputs go with their closures, before the caches are freed
    for adapter_factory in dict.fromkeys(cleanups):
        try:
            adapter_factory(opts.platform).cleanup()
        except Exception:  # noqa: BLE001 -- freeing a cache is best effort
            pass
    return [ordered(r) for r in rows], skipped


def _check_peers(case: cases_lib.Case, inputs, rows: list[dict]) -> None:
    """Compares each peer's forward output with the xla reference (``check_rel_err``)."""
    peer_rows = [r for r in rows if "_out" in r]
    if not peer_rows:
        return
    try:
        want = _reference_out(case, inputs)
    except Exception as e:  # noqa: BLE001
        for r in peer_rows:
            r.pop("_out")
            r["check"] = f"reference failed: {error_text(e)}"
        return
    tol = peers_lib.CHECK_RTOL[case.dtype]
    for r in peer_rows:
        err = peers_lib.relative_error(r.pop("_out"), want)
        r["check_rel_err"] = err if np.isfinite(err) else None
        r["check"] = "ok" if err <= tol else f"FAILED: forward off the reference by {err:.3g} (> {tol:g})"


def _device_times(timed: list[_Timed], opts: Options, log) -> None:
    """Fills each row's device time: trace, else CUDA events, else None with the reason."""
    if not timed:
        return
    if not opts.device_time:
        note = CPU_DEVICE_NOTE if opts.platform == "cpu" else "not measured (device time off)"
        for t in timed:
            t.row.update(device_ms=None, device_note=note)
        return
    n = QUICK_PROFILED_CALLS if opts.quick else PROFILED_CALLS
    runs = {t.row["impl"]: t.run for t in timed}
    try:
        traced = devtime.profile_calls(runs, n)
        trace_error = None
    except Exception as e:  # noqa: BLE001 -- no trace: every row says why
        traced, trace_error = {}, error_text(e)
        log(f"  profiler trace failed: {trace_error}")
    for t in timed:
        summary = devtime.summarize(traced.get(t.row["impl"], []))
        if summary is not None:
            t.row.update(summary, device_source="trace")
            continue
        if t.event_time is not None:
            try:
                ms = np.array([t.event_time(i) for i in range(n)]) * 1e3
                p50, p20, p80 = np.percentile(ms, [50, 20, 80])
                t.row.update(device_ms=float(p50), device_p20_ms=float(p20), device_p80_ms=float(p80),
                             device_source="cuda_events")
                continue
            except Exception as e:  # noqa: BLE001
                trace_error = trace_error or error_text(e)
        t.row.update(device_ms=None, device_note=f"trace failed: {trace_error}" if trace_error
                     else "no device events in the trace")
