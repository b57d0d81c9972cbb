"""Benchmark the ops against XLA: ``python -m fusedvjp.bench [options]``.

Times every (op, shape, dtype, mode) for each impl under ``jax.jit`` and prints a table
whose first column is the speedup over ``impl="xla"`` (XLA's autodiff of the plain-jnp
reference). With ``--out DIR`` it writes results.json, results.md and roofline.png.
``--table DIR/results.json`` prints the table of an earlier run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import threading

import jax

from fusedvjp.bench import cases as cases_lib
from fusedvjp.bench import report, roofline, timing

QUICK_ITERS = 5


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
    p.add_argument("--shapes", type=_csv(cases_lib.SHAPE_SETS), default=list(cases_lib.SHAPE_SETS),
                   help="mnist (with mnist_train_step) and/or llm (default both)")
    p.add_argument("--dtypes", type=_csv(cases_lib.DTYPES), default=list(cases_lib.DTYPES))
    p.add_argument("--modes", type=_csv(cases_lib.MODES), default=list(cases_lib.MODES))
    p.add_argument("--impls", type=_csv(cases_lib.IMPLS), default=list(cases_lib.IMPLS))
    p.add_argument("--out", default=None, help="write results.json, results.md, roofline.png here")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny shapes and {QUICK_ITERS} timed calls (a smoke run: the numbers mean nothing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", metavar="RESULTS_JSON", default=None, help="print the table of an earlier run and exit")
    return p.parse_args(argv)


def _platform() -> str:
    platform = jax.devices()[0].platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def run_case(case: cases_lib.Case, impls, roof: roofline.Roofline, *, quick: bool, seed: int, log=print) -> list[dict]:
    """Times ``case`` for each impl; a failure becomes that row's ``error`` (timings null).

    Args:
      case: what to time.
      impls: impl names, in row order.
      roof: the measured ceilings (for each row's throughput and % of roofline).
      quick: few calls and two input copies.
      seed: seed of the random inputs (the same inputs for every impl).
      log: progress sink.

    Returns:
      One row dict per impl (results.json's schema plus derived fields).
    """
    base = {"op": case.op, "shape": list(case.shape), "dtype": case.dtype, "mode": case.mode,
            "bytes": case.bytes(), "flops": case.flops()}
    try:
        inputs = case.input_copies(seed, max_copies=2 if quick else cases_lib.MAX_COPIES)
    except Exception as e:  # noqa: BLE001 -- recorded in the rows, the run goes on
        return [_error_row(base, impl, e) for impl in impls]
    rows = []
    for impl in impls:
        try:
            compiled = timing.compile_fn(case.function(impl), inputs[0])
            iters = dict(warmup=1, min_iters=QUICK_ITERS, max_iters=QUICK_ITERS) if quick else {}
            stats = timing.summarize(timing.time_calls(compiled.fn, inputs, **iters))
        except Exception as e:  # noqa: BLE001 -- recorded in the row, the run goes on
            rows.append(_error_row(base, impl, e))
            log(f"  {impl:<6} error: {rows[-1]['error']}")
            continue
        row = {**base, "impl": impl, "median_ms": stats.median * 1e3, "p20_ms": stats.p20 * 1e3,
               "p80_ms": stats.p80 * 1e3, "compile_s": compiled.compile_s, "peak_temp_bytes": compiled.peak_temp_bytes,
               "n_calls": stats.n, "input_copies": len(inputs)}
        row.update(roofline.row_metrics(row["bytes"], row["flops"], case.dtype, stats.median, roof))
        rows.append(_ordered(row))
        log(f"  {impl:<6} {row['median_ms']:.4g} ms (compile {row['compile_s']:.2f} s, {stats.n} calls)")
    return rows


_KEYS = ("op", "shape", "dtype", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "compile_s", "bytes", "flops",
         "peak_temp_bytes")


def _ordered(row: dict) -> dict:
    return {**{k: row[k] for k in _KEYS}, **{k: v for k, v in row.items() if k not in _KEYS}}


def _error_row(base: dict, impl: str, e: BaseException) -> dict:
    row = {**base, "impl": impl, "median_ms": None, "p20_ms": None, "p80_ms": None, "compile_s": None,
           "peak_temp_bytes": 0, "error": _error_text(e)}
    return _ordered(row)


def _notes(args, partial: bool) -> list[str]:
    notes = [
        "speedup = xla median / impl median; xla is JAX's autodiff of the plain-jnp reference.",
        "f32 matmuls run at Precision.HIGHEST (IEEE f32) in every impl and in the f32 ceiling; "
        "bf16 is the headline for llm shapes.",
        "Each row: median and p20/p80 of per-call times under jax.jit (inputs on the device, compile excluded "
        "and reported as compile s, warm-up first, inputs under 64 MiB rotated among copies); bytes and flops "
        "are the minimal traffic and work (registry); % roof = roofline time / median, roofline time = "
        "max(bytes / copy bandwidth, flops / matmul rate of the dtype).",
        "fwd+bwd = jax.vjp of the op w.r.t. its differentiable inputs, applied to a random cotangent.",
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
    platform = _platform()
    if platform == "cpu" and not args.quick and "llm" in args.shapes:
        log("warning: llm shapes on CPU (interpret mode) take very long; use --quick")
    log(f"measuring ceilings on {jax.devices()[0].device_kind} ...")
    roof = roofline.measure(platform, quick=args.quick)
    doc = {"device": str(jax.devices()[0].device_kind), "platform": platform, "jax_version": jax.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "roofline": {"hbm_gbps": roof.hbm_gbps, "bf16_tflops": roof.bf16_tflops, "f32_tflops": roof.f32_tflops},
           "results": []}
    log(report.header(doc))
    interrupted = False
    try:
        for i, case in enumerate(case_list, 1):
            log(f"[{i}/{len(case_list)}] {case.label}")
            doc["results"].extend(run_case(case, args.impls, roof, quick=args.quick, seed=args.seed + i, log=log))
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


def main(argv=None) -> dict:
    """CLI entry: runs, prints the summary table last, returns the results document."""
    args = parse_args(argv)
    if args.table:
        with open(args.table) as f:
            doc = json.load(f)
        print(report.summary(doc))
        return doc
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
