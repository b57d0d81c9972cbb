"""Benchmark the ops against XLA: ``python -m fusedvjp.bench [options]``.

Times every (op, shape, dtype, mode) for each impl under ``jax.jit`` and prints a table
whose first column is the speedup over the baseline: the faster of the users' code
(``user``: optax, Flax's LayerNorm, ``jnp.tanh(x @ w + b)``; :mod:`fusedvjp.bench.baselines`)
and the op's reference (``xla``: XLA's autodiff of the plain-jnp reference). With ``--out DIR`` it writes results.json, results.md and roofline.png.
``--table DIR/results.json`` prints the table of an earlier run.
``--static --target h100|h200|a100|b200|v5e|v6e`` times nothing: it compiles for that GPU or TPU on
this CPU machine and reports what the compiler decided (see :mod:`fusedvjp.bench.static`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import signal
import sys
import threading

import jax

from fusedvjp.bench import cases as cases_lib
from fusedvjp.bench import measure, peers as peers_lib, report, roofline, static
from fusedvjp.model.train import prepare_out

QUICK_ITERS = measure.QUICK_ITERS


def _csv(choices=None):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ops = sorted((*cases_lib.all_op_names(), *cases_lib.ALIASES))
    p = argparse.ArgumentParser(prog="python -m fusedvjp.bench", description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=_csv(ops), default=None, help=f"comma list (default all): {', '.join(ops)}")
    p.add_argument("--shapes", type=_csv(static.SHAPE_SETS), default=None,
                   help="mnist (with mnist_train_step) and/or llm (default both); --static also odd "
                        "(the registry's test shapes; default all three)")
    p.add_argument("--dtypes", type=_csv(cases_lib.DTYPES), default=list(cases_lib.DTYPES))
    p.add_argument("--modes", type=_csv(cases_lib.MODES), default=list(cases_lib.MODES))
    p.add_argument("--impls", type=_csv(cases_lib.IMPLS), default=list(cases_lib.IMPLS))
    p.add_argument("--out", default=None, help="write results.json, results.md, roofline.png here")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny shapes and {QUICK_ITERS} timed calls (a smoke run: the numbers mean nothing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", default="auto",
                   help="auto (every peer library on a GPU, none on a CPU), none, or a comma list of "
                        f"{', '.join(peer.short for peer in peers_lib.PEERS.values())} (run where they can, the CPU included)")
    p.add_argument("--targets-first", action="store_true",
                   help="time the cases the targets judge first (a run cut short by a time limit keeps them)")
    p.add_argument("--loop-n", type=int, default=measure.LOOP_N,
                   help=f"launch-bound rows (median under {measure.LAUNCH_BOUND_MS} ms) are also timed as N calls in "
                        "one dispatch (a fori_loop), per call; 0: off")
    p.add_argument("--table", metavar="RESULTS_JSON", default=None, help="print the table of an earlier run and exit")
    p.add_argument("--static", action="store_true",
                   help="time nothing: compile fwd+bwd for --target on this CPU machine and report registers, "
                        "shared memory, spills, occupancy, tensor-core use, peak memory and the roofline floor "
                        "(needs the aot extra); without --ops/--shapes/--dtypes it rewrites "
                        "bench/results/static-<target>/")
    p.add_argument("--target", type=_csv(static.TARGET_NAMES), default=None,
                   help=f"--static only: comma list of {', '.join(static.TARGET_NAMES)}")
    args = p.parse_args(argv)
    if args.static and not args.target:
        p.error("--static needs --target")
    if args.target and not args.static:
        p.error("--target goes with --static")
    if args.peers not in ("auto", "none"):
        try:
            peers_lib.resolve([n for n in args.peers.split(",") if n])
        except ValueError as e:
            p.error(f"--peers: {e}")
    if args.loop_n < 0:
        p.error(f"--loop-n must be >= 0, got {args.loop_n}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0 (numpy's generators take no negative seed), got {args.seed}")
    if args.shapes is None:
        args.shapes = list(static.SHAPE_SETS if args.static else cases_lib.SHAPE_SETS)
    elif not args.static and "odd" in args.shapes:
        p.error("--shapes odd goes with --static (the timed benchmark runs mnist and llm)")
    return args


def _platform() -> str:
    platform = jax.devices()[0].platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def run_case(case: cases_lib.Case, impls, roof: roofline.Roofline, *, quick: bool, seed: int, log=print,
             opts: measure.Options | None = None, skipped: list | None = None) -> list[dict]:
    """Times ``case`` for each impl (and the peers in ``opts``); a failure becomes that row's
    ``error`` (timings null). See :func:`fusedvjp.bench.measure.measure_case`.

    Args:
      case: what to time.
      impls: impl names, in row order.
      roof: the measured ceilings (for each row's throughput and % of roofline).
      quick: few calls and two input copies.
      seed: seed of the random inputs (the same inputs for every impl).
      log: progress sink.
      opts: device time, loop time and peers (default: as on this platform, no peers).
      skipped: where the peers that declined the case are appended (``{peer, op, case, reason}``).

    Returns:
      One row dict per impl and peer (results.json's schema plus derived fields).
    """
    platform = _platform()
    opts = dataclasses.replace(opts or measure.Options(quick, seed, platform, platform != "cpu", measure.LOOP_N),
                               quick=quick, seed=seed)
    rows, declined = measure.measure_case(case, impls, roof, opts, log)
    if skipped is not None:
        skipped.extend(declined)
    return rows


def _notes(args, partial: bool) -> list[str]:
    notes = [
        "speedup = baseline median / impl median; the baseline is the faster of user (the users' code, compiled "
        "by XLA) and xla (JAX's autodiff of the op's plain-jnp reference, the tests' oracle); the row's baseline "
        "field names which.",
        report.baseline_legend() + ".",
        "f32 matmuls run at Precision.HIGHEST (IEEE f32) in every impl and in the f32 ceiling; "
        "bf16 is the headline for llm shapes.",
        "Each row: median and p20/p80 of per-call times under jax.jit (inputs on the device, compile excluded "
        "and reported as compile s, warm-up first, inputs under 64 MiB rotated among copies); bytes and flops "
        "are the minimal traffic and work (registry); % roof = roofline time / median, roofline time = "
        "max(bytes / copy bandwidth, flops / matmul rate of the dtype).",
        "fwd+bwd = jax.vjp of the op w.r.t. its differentiable inputs, applied to a random cotangent.",
        "device ms = median over profiled calls of the device time per call (union of its kernels' intervals in a "
        "jax.profiler trace; torch rows fall back to CUDA events, marked *), dev speedup = baseline device ms / device ms, "
        "% roof dev = roofline time / device ms; n/a (CPU) on a CPU. loop ms = one call's share of "
        f"N calls run in one dispatch (lax.fori_loop, N = --loop-n, inputs unchanged), for rows under "
        f"{measure.LAUNCH_BOUND_MS} ms: dispatch amortized.",
        "peer:* rows: other libraries on the same inputs and contract (see ## Peers); their forward output is "
        "checked against the xla reference.",
    ]
    if args.quick:
        notes.append(f"--quick: tiny shapes and {QUICK_ITERS} timed calls per row (not >= 30): a smoke run.")
    if _platform() == "cpu":
        notes.append("CPU run: Pallas runs in interpret mode; these numbers say nothing about GPU speed.")
    if partial:
        notes.append("PARTIAL: the run was stopped (or is still running) before every case ran; rows may be missing.")
    return notes


class _Terminated(BaseException):  # not caught by the per-row `except Exception`
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def run(args: argparse.Namespace, log=print) -> dict:
    """Runs the benchmark described by ``args``; returns the results.json document."""
    case_list = cases_lib.build_cases(args.ops, args.shapes, args.dtypes, args.modes, quick=args.quick)
    if getattr(args, "targets_first", False):
        judged = {(t.op, t.shape, t.dtype, t.mode) for t in report.targets()}
        case_list.sort(key=lambda c: (c.op, c.shape, c.dtype, c.mode) not in judged)  # stable: the rest keep order
    platform = _platform()
    if platform == "cpu" and not args.quick and "llm" in args.shapes:
        log("warning: llm shapes on CPU (interpret mode) take very long; use --quick")
    log(f"measuring ceilings on {jax.devices()[0].device_kind} ...")
    roof = roofline.measure(platform, quick=args.quick)
    run_peers, peer_record = peers_lib.select(args.peers, platform, list(dict.fromkeys(c.op for c in case_list)))
    opts = measure.Options(args.quick, args.seed, platform, device_time=platform != "cpu", loop_n=args.loop_n,
                           peers=run_peers)
    doc = {"device": str(jax.devices()[0].device_kind), "platform": platform, "jax_version": jax.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "roofline": {"hbm_gbps": roof.hbm_gbps, "bf16_tflops": roof.bf16_tflops, "f32_tflops": roof.f32_tflops},
           "device_time": _device_time_record(platform), "tuning": _tuning_record(), "peers": peer_record,
           "results": []}
    log(report.header(doc))
    for skip in peer_record["skipped"]:
        log(f"peer {skip['peer']} skipped{' (' + skip['op'] + ')' if 'op' in skip else ''}: {skip['reason']}")
    interrupted = False
    try:
        for i, case in enumerate(case_list, 1):
            log(f"[{i}/{len(case_list)}] {case.label}")
            doc["results"].extend(run_case(case, args.impls, roof, quick=args.quick, seed=args.seed + i, log=log,
                                           opts=opts, skipped=peer_record["skipped"]))
            report.add_speedups(doc["results"])
            if args.out:  # after every case, so a run stopped by a timeout leaves its rows
                report.write_outputs(doc, args.out, _notes(args, True), plot=False)
    except (KeyboardInterrupt, _Terminated):
        interrupted = True
        log("interrupted: writing the rows measured so far")
    report.add_speedups(doc["results"])
    if args.out:
        report.write_outputs(doc, args.out, _notes(args, interrupted))
    return doc


def _device_time_record(platform: str) -> dict:
    if platform == "cpu":
        return {"measured": False, "note": "n/a (CPU): no device to trace; device_ms is null"}
    return {"measured": True, "note": f"device_ms: median over {measure.PROFILED_CALLS} calls of the union of the "
            "call's kernel intervals in a jax.profiler trace (torch rows: CUDA events where the trace saw none)"}


def _tuning_record() -> dict:
    """Which block-size table the pallas rows read, and how many entries it has for this device."""
    from fusedvjp.kernels import _common

    try:
        entries = _common.tuning_table().get(str(jax.devices()[0].device_kind), {})
        error = None
    except (OSError, ValueError) as e:
        entries, error = {}, str(e)
    record = {"file": str(_common.tuning_path()), "device_entries": len(entries)}
    if error:
        record["error"] = error
    return record


_DOC_KEYS = ("device", "platform", "jax_version", "date", "roofline", "results")


def _read_table(path: str) -> tuple[dict, str]:
    """An earlier run's results.json and its summary table.

    Raises:
      SystemExit: the file cannot be read, is not JSON, or is not a results.json of this
        benchmark (the message names the file and the problem).
    """
    def fail(problem: str):
        return SystemExit(f"error: --table {path}: {problem}")

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise fail(f"cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise fail(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise fail(f"not a results.json of python -m fusedvjp.bench (a JSON {type(doc).__name__}, not an object)")
    missing = [k for k in _DOC_KEYS if k not in doc]
    if missing:
        raise fail(f"not a results.json of python -m fusedvjp.bench (missing {', '.join(missing)})")
    try:
        return doc, report.summary(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a row or the roofline lacks a field
        raise fail(f"malformed results.json ({type(e).__name__}: {e})") from None


def _check_before_timing(args: argparse.Namespace) -> None:
    """Fails fast on what would otherwise surface after minutes of timing: a selection
    with no case, and an ``--out`` that cannot be written.

    Raises:
      SystemExit: with what was selected, or the ``--out`` path and the reason.
    """
    if not cases_lib.build_cases(args.ops, args.shapes, args.dtypes, args.modes, quick=args.quick):
        selected = " ".join(f"--{name} {','.join(getattr(args, name))}"
                            for name in ("ops", "shapes", "dtypes", "modes") if getattr(args, name) is not None)
        offered = []
        for op in dict.fromkeys(cases_lib.resolve_op(o) for o in (args.ops or cases_lib.all_op_names())):
            op_cases = cases_lib.build_cases([op], quick=args.quick)  # every shape set, dtype and mode
            shape_sets = ",".join(dict.fromkeys(c.shape_set for c in op_cases)) or "none"
            offered.append(f"{cases_lib.short_name(op)}: shapes {shape_sets}, "
                           f"modes {','.join(sorted({c.mode for c in op_cases}))}")
        raise SystemExit(f"error: no benchmark case matches {selected} (what each op offers: {'; '.join(offered)})")
    if args.out:
        prepare_out(args.out)


def main(argv=None) -> dict:
    """CLI entry: runs, prints the summary table last, returns the results document."""
    args = parse_args(argv)
    if args.table:
        doc, table = _read_table(args.table)
        print(table)
        return doc
    if args.static:
        docs = static.main(args.target, args.ops, args.shapes, args.dtypes, args.out)
        if any(r["problems"] for doc in docs for r in doc["results"]):
            raise SystemExit(1)
        return {"targets": docs}
    _check_before_timing(args)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 -- progress to stderr, table to stdout
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # a SIGTERM (from `timeout`) still writes the files, as Ctrl-C does
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        doc = run(args, log)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(report.summary(doc), flush=True)
    if args.out:
        print(f"wrote {args.out}/results.json, results.md, roofline.png")
    return doc


if __name__ == "__main__":
    main()
