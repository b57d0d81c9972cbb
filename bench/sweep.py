"""Block-size sweep: time each kernel's legal block sizes at the benchmark shapes, keep the best.

``python -m fusedvjp.bench.sweep [--ops ...] [--dtypes ...] [--out DIR] [--tuning-out FILE]
[--budget-s S] [--quick]`` on a GPU: for every (kernel, dtype, shape bucket) the benchmark
shapes reach, time the op's forward + backward (``impl="pallas"``, exactly what the
benchmark runs) with each candidate block size forced, on the same inputs, and write the
winner with its evidence to the tuning table (``kernels/tuning.json`` format) that each
block-size ``default()`` reads (:func:`fusedvjp.kernels._common.tuned_block_sizes`).

Candidates come from each block-size dataclass's legal space: the heuristic default, then
its neighbours (one field one step up or down: a power of two for tiles and warps, one
pipeline stage), capped by the problem (no tile beyond the dimension's power of two), kept
where the kernel lowers. So no GPU second goes to a config that cannot lower, spills or
does not fit, the candidate list is computed ahead on a CPU and committed
(``bench/sweep_candidates.json``):

* ``python -m fusedvjp.bench.sweep --write-candidates``: legality only (each candidate
  lowered for an abstract H100 with the main venv);
* ``.venv-aot/bin/python -m fusedvjp.bench.sweep --write-candidates --static h100``: also
  compiled for the H100 with XLA's CUDA compiler on this CPU (``bench/static.py``): a
  candidate that fails to compile, spills registers or leaves a bf16 dot off the tensor
  cores is dropped, and each kept one carries its registers, shared memory and occupancy.

On the GPU a bucket with no committed list gets the neighbours generated on the spot.
The winner replaces the heuristic only if it is at least :data:`MIN_GAIN` faster by device
time (the profiler trace; wall clock where there is none); otherwise the heuristic is kept,
now with evidence. Triton (GPU) block spaces only; on a CPU (``--quick``) the kernels run in
interpret mode, which checks the plumbing and says nothing about speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from fusedvjp.bench import cases as cases_lib
from fusedvjp.bench import devtime, timing
from fusedvjp.kernels import _common
from fusedvjp.kernels.dense import DenseBlockSizes
from fusedvjp.kernels.layer_norm import LayerNormBlockSizes
from fusedvjp.kernels.softmax_cross_entropy import CrossEntropyBlockSizes
from fusedvjp.ops import registry

HERE = pathlib.Path(__file__).resolve().parent
CANDIDATES_FILE = HERE / "sweep_candidates.json"
BACKEND = "triton"
# The winner must beat the heuristic by this fraction, else the heuristic stays (noise).
MIN_GAIN = 0.03
# Candidates kept per bucket in the committed list, and timed per bucket on the GPU.
MAX_CANDIDATES = 10
GPU_CANDIDATES = 6
QUICK_CANDIDATES = 2
# Device kind -> the static target whose candidate list serves it (same SM 9.0 compile).
TARGET_OF_DEVICE = (("H100", "h100"), ("H200", "h100"), ("H800", "h100"))
# For --write-candidates: the abstract device legality is checked for.
ABSTRACT_H100 = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")

_POW2 = lambda lo, hi: [1 << i for i in range(lo.bit_length() - 1, hi.bit_length())]  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel family as the tuning table names it, its block-size dataclass, the registry
    ops that run it, and its Triton space: field -> allowed values, and which of
    ``default()``'s dimensions caps each tile field."""

    name: str
    cls: type
    ops: tuple[str, ...]
    space: dict[str, list[int]]
    caps: dict[str, int]  # field -> index into default()'s dims
    default_kwargs: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. which dense kernel


# The dense op runs three kernels with their own tiles, tuned one at a time (the other
# two at their defaults), each over the same space.
_DENSE_SPACE = {"block_m": _POW2(16, 256), "block_n": _POW2(16, 256), "block_k": _POW2(16, 128),
                "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]}


KERNELS = (
    *(Kernel(f"dense_{kernel}", DenseBlockSizes, ("dense_tanh", "dense"), _DENSE_SPACE,
             {"block_m": 0, "block_n": 1, "block_k": 2}, {"kernel": kernel}) for kernel in ("fwd", "dx", "dw")),
    Kernel("softmax_cross_entropy", CrossEntropyBlockSizes,
           ("softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy"),
           {"block_n": _POW2(1, 256), "block_v": _POW2(16, 8192), "num_warps": [1, 2, 4, 8, 16],
            "num_stages": [1, 2, 3, 4]},
           {"block_n": 0, "block_v": 1}),
    Kernel("layer_norm", LayerNormBlockSizes, ("layer_norm",),
           {"block_rows": _POW2(1, 256), "block_cols": _POW2(16, 4096), "num_warps": [1, 2, 4, 8, 16],
            "num_stages": [1, 2, 3]},
           {"block_rows": 0, "block_cols": 1}),
)
KERNELS_OF_OP = {op: tuple(k for k in KERNELS if op in k.ops) for kernel in KERNELS for op in kernel.ops}


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One tuning-table key and the benchmark case that reaches it."""

    kernel: Kernel
    case: cases_lib.Case
    key: str
    dims: tuple[int, ...]
    dtype: str  # numpy name, as in the key
    heuristic: Any

    @property
    def label(self) -> str:
        return f"{self.key} ({self.case.label})"


def _triton_only():
    # The sweep tunes the Triton kernels: on an H100 the Mosaic GPU ones would take the
    # bf16 dense cases (and their tiles are not DenseBlockSizes).
    return _common.disabled_backends("mosaic_gpu")


def _abstract_inputs(case: cases_lib.Case):
    return jax.eval_shape(lambda: case.make_inputs(seed=0))  # no 2 GiB of logits drawn


def _forced_lookups(case: cases_lib.Case, kernel: Kernel, forced, lower: Callable[[Any, tuple], Any]):
    """Traces (``lower``) the case's pallas fwd+bwd with ``forced`` block sizes for ``kernel``;
    returns (lower's result, the Triton lookups of ``kernel`` made while tracing)."""
    with _common.tuning_session({(kernel.name, BACKEND): forced}) as session, _triton_only():
        jax.clear_caches()  # lookups run at trace time; a cached trace would skip them
        result = lower(case.function("pallas"), _abstract_inputs(case))
    return result, [lk for lk in session.lookups if lk["kernel"] == kernel.name and lk["backend"] == BACKEND]


def _eval_shape(fn, args):
    return jax.eval_shape(fn, *args)


def probe(case: cases_lib.Case, kernel: Kernel | None = None) -> Bucket:
    """The tuning key ``case`` looks up for ``kernel`` (default: the op's first) and the
    heuristic config it gets there."""
    kernel = kernel or KERNELS_OF_OP[case.op][0]
    _, lookups = _forced_lookups(case, kernel, None, _eval_shape)
    keys = {lk["key"] for lk in lookups}
    if len(keys) != 1:
        raise RuntimeError(f"{case.label}: expected one {kernel.name} tuning key, traced {sorted(keys) or 'none'}")
    lk = lookups[0]
    with _common.tuning_session({(kernel.name, BACKEND): None}), _triton_only():
        heuristic = kernel.cls.default(*lk["dims"], lk["dtype"], BACKEND, **kernel.default_kwargs)
    return Bucket(kernel, case, lk["key"], lk["dims"], lk["dtype"], heuristic)


def buckets(ops: Iterable[str] | None = None, shape_sets: Sequence[str] = ("llm", "mnist"),
            dtypes: Sequence[str] = ("bf16", "f32"), quick: bool = False) -> list[Bucket]:
    """Every (kernel, dtype, bucket) the benchmark's fwd+bwd cases reach, in sweep order:
    dtype, shape set, registry op order; the first op reaching a key owns it."""
    op_names = [cases_lib.resolve_op(o) for o in ops] if ops else list(registry.REGISTRY)
    out, seen = [], set()
    for dtype in dtypes:
        for shape_set in shape_sets:
            for case in cases_lib.build_cases([o for o in op_names if o in KERNELS_OF_OP], [shape_set], [dtype],
                                              ["fwd+bwd"], quick=quick):
                for kernel in KERNELS_OF_OP[case.op]:
                    bucket = probe(case, kernel)
                    if bucket.key not in seen:
                        seen.add(bucket.key)
                        out.append(bucket)
    return out


# --- candidates ------------------------------------------------------------------------------------


def neighbours(bucket: Bucket, radius: int = 1) -> list[Any]:
    """The heuristic, then every config ``radius`` steps or fewer from it in the space (one
    step = one field to the next allowed value), nearest first; tiles capped by the problem."""
    kernel, base = bucket.kernel, dataclasses.asdict(bucket.heuristic)
    allowed = {}
    for field, values in kernel.space.items():
        cap = kernel.caps.get(field)
        limit = max(values[0], _common.next_power_of_two(bucket.dims[cap])) if cap is not None else math.inf
        allowed[field] = sorted({v for v in values if v <= limit} | {base[field]})
    frontier, seen, out = [base], {tuple(sorted(base.items()))}, [bucket.heuristic]
    for _ in range(radius):
        nxt = []
        for cfg in frontier:
            for field, values in allowed.items():
                i = values.index(cfg[field])
                for j in (i - 1, i + 1):
                    if 0 <= j < len(values):
                        cand = {**cfg, field: values[j]}
                        key = tuple(sorted(cand.items()))
                        if key not in seen:
                            seen.add(key)
                            nxt.append(cand)
        for cand in nxt:
            try:
                out.append(kernel.cls(**cand))
            except ValueError:
                pass
        frontier = nxt
    return out


def _lower_for_h100(fn, args):
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(**ABSTRACT_H100))):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def check_legal(bucket: Bucket, config) -> str | None:
    """None if the case lowers for an abstract H100 with ``config``, else why not."""
    try:
        _, lookups = _forced_lookups(bucket.case, bucket.kernel, config, _lower_for_h100)
    except Exception as e:  # noqa: BLE001 -- the reason is the result
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if not any(lk["source"] == "forced" for lk in lookups):
        return "the forced block sizes were not looked up (trace cache?)"
    return None


def check_static(bucket: Bucket, config, target: str, work_dir: pathlib.Path) -> tuple[str | None, dict]:
    """Compiles the case for ``target`` with ``config`` (``bench/static.py``, aot venv):
    (None or the problems, per-kernel registers / smem / spills / occupancy)."""
    from fusedvjp.bench import static

    case = static.StaticCase(bucket.case.op, bucket.case.shape, bucket.case.dtype, bucket.case.shape_set)
    record, lookups = _forced_lookups(bucket.case, bucket.kernel, config,
                                      lambda fn, args: static.analyze(case, target, work_dir))
    keep = ("kernel", "registers", "smem_bytes", "spill_store_bytes", "spill_load_bytes", "occupancy", "wgmma", "mma")
    stats = {"kernels": [{k: kr.get(k) for k in keep} for kr in record.get("kernels", [])
                         if kr.get("source") == "pallas"]}
    if not any(lk["source"] == "forced" for lk in lookups):
        return "the forced block sizes were not looked up (trace cache?)", stats
    return ("; ".join(record["problems"]) or None), stats


def write_candidates(ops=None, static_target: str | None = None, path: pathlib.Path = CANDIDATES_FILE,
                     radius: int = 1, log=print) -> dict:
    """Computes and writes the committed candidate list (see the module docstring)."""
    target = static_target or "h100"
    doc = {"schema": 1, "backend": BACKEND,
           "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "jax_version": jax.__version__,
           "prefilter": {target: (f"static: compiled for {static_target} by bench/static.py (aot venv); dropped: "
                                  "compile errors, register spills, bf16 dots off the tensor cores")
                         if static_target else "legality: lowered for an abstract H100 (not compiled; run "
                         "`.venv-aot/bin/python -m fusedvjp.bench.sweep --write-candidates --static h100` to "
                         "drop configs that spill or do not fit)"},
           "targets": {target: {}}}
    if static_target:
        from fusedvjp.bench import static

        static.use_cpu_backend()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fusedvjp-sweep-") as tmp:
        for bucket in buckets(ops):
            kept, rejected = [], []
            for i, cfg in enumerate(neighbours(bucket, radius)):
                why = check_legal(bucket, cfg)
                stats: dict = {}
                if why is None and static_target:
                    why, stats = check_static(bucket, cfg, static_target, pathlib.Path(tmp) / f"{len(kept)}-{i}")
                entry = {"config": dataclasses.asdict(cfg), **stats}
                if why:
                    rejected.append({**entry, "reason": why})
                elif len(kept) < MAX_CANDIDATES:
                    kept.append(entry)
                log(f"{bucket.label}: {dataclasses.asdict(cfg)} {'ok' if not why else why[:120]}")
            doc["targets"][target][bucket.key] = {
                "op": bucket.case.op, "shape": list(bucket.case.shape), "dtype": bucket.case.dtype,
                "heuristic": dataclasses.asdict(bucket.heuristic), "candidates": kept, "rejected": rejected}
            path.write_text(json.dumps(doc, indent=1) + "\n")  # after each bucket: a long run leaves its part
    return doc


# --- timing on the device ----------------------------------------------------------------------------


def target_of(device_kind: str) -> str | None:
    return next((t for name, t in TARGET_OF_DEVICE if name in device_kind), None)


def committed_candidates(bucket: Bucket, device_kind: str, path: pathlib.Path = CANDIDATES_FILE) -> list | None:
    """The committed candidates for this bucket on this device (None if there are none)."""
    target = target_of(device_kind)
    if target is None or not path.exists():
        return None
    entry = json.loads(path.read_text()).get("targets", {}).get(target, {}).get(bucket.key)
    if not entry:
        return None
    return [bucket.kernel.cls(**c["config"]) for c in entry["candidates"]]


def _compile(fn, args, kernel: Kernel, config):
    """Lowers under the forced config here (tracing is not thread-safe with the session);
    returns a thunk that compiles (run in a worker thread)."""
    with _common.tuning_session({(kernel.name, BACKEND): config}) as session, _triton_only():
        jax.clear_caches()
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        lower_s = time.perf_counter() - start
    if not any(lk["source"] == "forced" for lk in session.lookups):
        raise RuntimeError("the forced block sizes were not looked up")

    def compile_now():
        t0 = time.perf_counter()
        exe = lowered.compile()
        return exe, lower_s + time.perf_counter() - t0

    return compile_now


def time_bucket(bucket: Bucket, configs: Sequence[Any], *, seed: int, quick: bool, device_time: bool,
                workers: int, log=print) -> dict:
    """Times each config at the bucket's case; returns its sweep record (each config's numbers)."""
    case = bucket.case
    inputs = case.input_copies(seed, max_copies=2 if quick else cases_lib.MAX_COPIES)
    fn = case.function("pallas")
    results = [{"config": dataclasses.asdict(c)} for c in configs]
    thunks = {}
    for i, cfg in enumerate(configs):
        try:
            thunks[i] = _compile(fn, inputs[0], bucket.kernel, cfg)
        except Exception as e:  # noqa: BLE001 -- a config that does not lower is a result
            results[i]["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    compiled = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(thunk): i for i, thunk in thunks.items()}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            try:
                compiled[i], results[i]["compile_s"] = fut.result()
            except Exception as e:  # noqa: BLE001
                results[i]["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    iters = dict(warmup=1, min_iters=3, max_iters=3) if quick else dict(min_iters=10, max_iters=60, target_s=0.15)
    runs = {}
    for i in sorted(compiled):
        exe = compiled[i]
        try:
            stats = timing.summarize(timing.time_calls(exe, inputs, **iters))
        except Exception as e:  # noqa: BLE001
            results[i]["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            continue
        results[i]["median_ms"] = stats.median * 1e3
        runs[f"c{i}"] = lambda k, exe=exe: jax.block_until_ready(exe(*inputs[k % len(inputs)]))
    if device_time and runs:
        try:
            traced = devtime.profile_calls(runs, 3 if quick else 10)
        except Exception as e:  # noqa: BLE001
            traced = {}
            log(f"  profiler trace failed: {type(e).__name__}: {e}")
        for label, calls in traced.items():
            summary = devtime.summarize(calls)
            if summary:
                results[int(label[1:])]["device_ms"] = summary["device_ms"]
    return {"key": bucket.key, "op": case.op, "shape": list(case.shape), "dtype": case.dtype, "results": results}


def choose(record: dict, heuristic: dict) -> dict | None:
    """The table entry for a timed bucket: the fastest config if it beats the heuristic by
    :data:`MIN_GAIN`, else the heuristic, with the evidence; None if nothing was timed."""
    timed = [r for r in record["results"] if "median_ms" in r]
    if not timed:
        return None
    metric = "device_ms" if all("device_ms" in r for r in timed) else "median_ms"
    best = min(timed, key=lambda r: r[metric])
    base = next((r for r in timed if r["config"] == heuristic), None)
    gain = None if base is None else 1 - best[metric] / base[metric]
    chosen = best if base is None or gain >= MIN_GAIN else base
    return {"config": chosen["config"], "evidence": {
        "op": record["op"], "shape": record["shape"], "dtype": record["dtype"], "metric": metric,
        "ms": chosen[metric], "heuristic_ms": None if base is None else base[metric], "heuristic": heuristic,
        "best_gain": gain, "kept_heuristic": chosen is base, "candidates_timed": len(timed),
        "candidates_failed": len(record["results"]) - len(timed),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__}}


def run(args: argparse.Namespace, log=print) -> dict:
    """The GPU sweep: times every bucket within ``args.budget_s``; writes the sweep record and
    the merged tuning table after each bucket."""
    start = time.perf_counter()
    device = jax.devices()[0]
    kind = str(device.device_kind)
    platform = "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform
    if platform == "tpu":
        raise SystemExit("sweep: Triton block spaces only; nothing to sweep on a TPU yet")
    per_bucket = QUICK_CANDIDATES if args.quick else args.per_bucket
    base_table = _common.tuning_table()
    table = {"schema": 1, "about": json.loads(_common.TUNING_FILE.read_text()).get("about", ""),
             "entries": {k: dict(v) for k, v in base_table.items()}}
    sweep = {"device": kind, "platform": platform, "jax_version": jax.__version__, "quick": args.quick,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "buckets": []}
    todo = buckets(args.ops, args.shapes, args.dtypes, quick=args.quick)
    log(f"sweep on {kind}: {len(todo)} buckets, up to {per_bucket} candidates each, budget {args.budget_s:.0f} s")
    for n, bucket in enumerate(todo, 1):
        if time.perf_counter() - start > args.budget_s:
            sweep["buckets"].append({"key": bucket.key, "skipped": "out of time"})
            continue
        committed = None if args.quick else committed_candidates(bucket, kind)
        configs = list(committed if committed is not None else neighbours(bucket))
        if bucket.heuristic not in configs:
            configs.insert(0, bucket.heuristic)
        configs = configs[:per_bucket]
        t0 = time.perf_counter()
        record = time_bucket(bucket, configs, seed=args.seed + n, quick=args.quick, device_time=platform != "cpu",
                             workers=args.workers, log=log)
        record["candidates_from"] = "committed" if committed is not None else "generated (legality at compile)"
        entry = choose(record, dataclasses.asdict(bucket.heuristic))
        record["seconds"] = time.perf_counter() - t0
        sweep["buckets"].append(record)
        if entry is not None:
            table["entries"].setdefault(kind, {})[bucket.key] = entry
            ev = entry["evidence"]
            log(f"[{n}/{len(todo)}] {bucket.label}: {entry['config']} {ev['metric']} {ev['ms']:.4g} "
                f"(heuristic {ev['heuristic_ms'] if ev['heuristic_ms'] is None else format(ev['heuristic_ms'], '.4g')})"
                f", {record['seconds']:.1f} s")
        else:
            log(f"[{n}/{len(todo)}] {bucket.label}: nothing timed ({record['results'][0].get('error', '')[:120]})")
        _write(args, sweep, table)
    _write(args, sweep, table)
    return sweep


def _write(args, sweep: dict, table: dict) -> None:
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(sweep, indent=1) + "\n")
    if args.tuning_out:
        path = pathlib.Path(args.tuning_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusedvjp.bench.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=lambda s: [t for t in s.split(",") if t], default=None,
                   help="comma list of registry ops (default: every op with a kernel)")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["llm", "mnist"])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["bf16", "f32"])
    p.add_argument("--out", default=None, help="write sweep.json (every candidate's numbers) here")
    p.add_argument("--tuning-out", default=None,
                   help="write the tuning table (the current one plus this device's winners) to this file")
    p.add_argument("--budget-s", type=float, default=math.inf, help="stop starting buckets after this many seconds")
    p.add_argument("--per-bucket", type=int, default=GPU_CANDIDATES, help="candidates timed per bucket")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny shapes, {QUICK_CANDIDATES} candidates per bucket (CPU smoke run: interpret mode)")
    p.add_argument("--write-candidates", action="store_true",
                   help=f"compute the candidate list on this CPU and write {CANDIDATES_FILE.name} (times nothing)")
    p.add_argument("--static", default=None, metavar="TARGET",
                   help="--write-candidates: also compile for TARGET (h100) with bench/static.py (aot venv)")
    args = p.parse_args(argv)
    if args.static and not args.write_candidates:
        p.error("--static goes with --write-candidates")
    # NaN compares false with everything: `--budget-s nan` would never stop a bucket.
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0 (inf: no budget), got {args.budget_s}")
    for name in ("per_bucket", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0 (numpy's generators take no negative seed), got {args.seed}")
    return args


def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.write_candidates:
        doc = write_candidates(args.ops, args.static, log=log)
        n = sum(len(e["candidates"]) for e in doc["targets"][args.static or "h100"].values())
        print(f"wrote {CANDIDATES_FILE}: {n} candidates in {len(doc['targets'][args.static or 'h100'])} buckets")
        return doc
    sweep = run(args, log)
    timed = [b for b in sweep["buckets"] if "results" in b]
    print(f"sweep: {len(timed)} of {len(sweep['buckets'])} buckets timed"
          + (f"; wrote {args.tuning_out}" if args.tuning_out else ""))
    return sweep


if __name__ == "__main__":
    main()
