"""Reporting: speedups, targets, the stdout table, results.json / results.md / roofline.png."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence

from fusedvjp.bench import baselines, cases as cases_lib
from fusedvjp.bench.roofline import Roofline
from fusedvjp.ops import registry

XENT = "softmax_cross_entropy_with_integer_labels"


def case_key(row: dict) -> tuple:
    """(op, shape, dtype, mode): the rows of one case, one per impl, share it."""
    return row["op"], tuple(row["shape"]), row["dtype"], row["mode"]


# The rows a case's baseline is chosen from: the users' code and the project's reference.
BASELINE_IMPLS = (cases_lib.USER, "xla")


def add_speedups(rows: Sequence[dict]) -> None:
    """Sets ``speedup = baseline median / row median`` and ``device_speedup = baseline
    device ms / row device ms`` on each row (None without both times), the baseline being
    the faster of the case's ``user`` and ``xla`` rows (``baseline`` and ``device_baseline``
    name it: the users' code, or the reference where that is faster)."""
    for field, out, named in (("median_ms", "speedup", "baseline"), ("device_ms", "device_speedup", "device_baseline")):
        best: dict[tuple, dict] = {}
        for r in rows:
            if r["impl"] in BASELINE_IMPLS and r.get(field):
                key = case_key(r)
                if key not in best or r[field] < best[key][field]:
                    best[key] = r
        for r in rows:
            base = best.get(case_key(r))
            r[out] = base[field] / r[field] if base and r.get(field) else None
            r[named] = base["impl"] if base else None


# --- targets ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal the table is judged against (for the fused impl, on a GPU).

    ``metric``: ``"speedup"`` (speedup over the baseline >= threshold), ``"floor"`` (median over the
    memory floor ``bytes / hbm bandwidth`` <= threshold) or ``"matmul_rate"`` (achieved
    TFLOP/s over the measured matmul rate of the dtype >= threshold).
    """

    description: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    metric: str
    threshold: float
    impl: str = "pallas"


# Byte-count ceilings of a speedup over the users' code (tests_aot/test_baseline_passes.py
# counts the passes): optax's cross-entropy moves 3 reads + 1 write of the logits against
# the fused floor's 2 + 1, so no kernel can beat it by more than 4/3 on a memory-bound
# case; Flax's LayerNorm VJP moves 5 + 2 passes of x's size against 3 + 2: 7/5.
XENT_CEILING = 4 / 3
LAYER_NORM_CEILING = 7 / 5


def targets() -> list[Target]:
    """The targets, with shapes taken from the registry (fwd+bwd, impl pallas; bf16, and
    also f32 for the MNIST shapes, the dtype the MNIST model trains in). A speedup is over
    the baseline: the faster of the users' code (``user``) and the reference (``xla``)."""
    out = []
    for shape in registry.get(XENT).bench_shapes["llm"]:
        if shape[1] >= 32768:
            out.append(Target(f"xent fwd+bwd >= 1.2x the baseline (byte ceiling {XENT_CEILING:.2f}x)", XENT,
                              tuple(shape), "bf16", "fwd+bwd", "speedup", 1.2))
            out.append(Target("xent fwd+bwd within 1.25x of the 2-reads-1-write floor", XENT, tuple(shape),
                              "bf16", "fwd+bwd", "floor", 1.25))
    for shape in registry.get("layer_norm").bench_shapes["llm"]:
        out.append(Target(f"layer_norm fwd+bwd >= 1.2x the baseline (byte ceiling {LAYER_NORM_CEILING:.2f}x)",
                          "layer_norm", tuple(shape), "bf16", "fwd+bwd", "speedup", 1.2))
    dense = registry.get("dense_tanh").bench_shapes
    # The MNIST shapes are judged in f32 too: that is the dtype the MNIST model trains in.
    for shape, dtype in [*((s, d) for s in dense["mnist"] for d in ("bf16", "f32")), *((s, "bf16") for s in dense["llm"])]:
        out.append(Target("dense_tanh fwd+bwd >= 1.0x the baseline", "dense_tanh", tuple(shape), dtype, "fwd+bwd",
                          "speedup", 1.0))
    for shape in dense["llm"]:
        out.append(Target("dense_tanh fwd+bwd >= 60% of the measured bf16 matmul rate", "dense_tanh",
                          tuple(shape), "bf16", "fwd+bwd", "matmul_rate", 0.6))
    for dtype in ("f32", "bf16"):
        out.append(Target("mnist_train_step >= 1.0x the baseline", cases_lib.TRAIN_STEP, cases_lib.TRAIN_STEP_SHAPE,
                          dtype, "fwd+bwd", "speedup", 1.0))
    return out


def evaluate(target: Target, rows: Sequence[dict], roof: Roofline) -> dict:
    """Judges one target: ``{"status": "met" | "missed" | "not measured", "ratio", "detail"}``."""
    key = (target.op, target.shape, target.dtype, target.mode)
    row = next((r for r in rows if case_key(r) == key and r["impl"] == target.impl), None)
    if row is None or not row.get("median_ms"):
        why = f" ({row['error'][:80]})" if row is not None and row.get("error") else ""
        return {"status": "not measured", "ratio": None, "detail": "not measured" + why}
    if target.metric == "speedup":
        ratio = row.get("speedup")
        if ratio is None:
            return {"status": "not measured", "ratio": None, "detail": "not measured (no user or xla row)"}
        met, shown = ratio >= target.threshold, f"{ratio:.2f}x the baseline ({row['baseline']})"
        need = f">= {target.threshold:g}x"
    elif target.metric == "floor":
        ratio = row["median_ms"] / (row["bytes"] / (roof.hbm_gbps * 1e9) * 1e3)
        met, shown, need = ratio <= target.threshold, f"{ratio:.2f}x the floor", f"<= {target.threshold:g}x"
    elif target.metric == "matmul_rate":
        ratio = row["flops"] / (row["median_ms"] * 1e-3) / 1e12 / roof.peak_tflops(target.dtype)
        met, shown, need = ratio >= target.threshold, f"{100 * ratio:.0f}% of the rate", \
            f">= {100 * target.threshold:.0f}%"
    else:
        raise ValueError(f"unknown target metric {target.metric!r}")
    status = "met" if met else "missed"
    return {"status": status, "ratio": ratio, "detail": f"{status} ({shown}" + ("" if met else f"; needs {need}") + ")"}


# --- text -----------------------------------------------------------------------------------

COLUMNS = ("speedup", "op", "shape", "dtype", "mode", "impl", "median ms", "p20-p80 ms", "device ms", "dev speedup",
           "loop ms", "GB/s", "TFLOP/s", "% roof", "% roof dev", "bound", "compile s", "temp MiB")


def _cells(r: dict) -> list[str]:
    def num(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    failed = str(r.get("check", "")).startswith("FAILED")  # a peer whose forward is wrong: its time does not count
    common = [cases_lib.short_name(r["op"]), "x".join(map(str, r["shape"])), r["dtype"], r["mode"],
              r["impl"] + ("!" if failed else "")]
    if not r.get("median_ms"):
        return ["-", *common, "error: " + (r.get("error") or "no time")[:70]] + [""] * (len(COLUMNS) - 7)
    speedup, dev_speedup = r.get("speedup"), r.get("device_speedup")
    if r.get("device_ms"):
        device = num(r["device_ms"], ".4g") + ("*" if r.get("device_source") == "cuda_events" else "")
    else:
        device = "n/a (CPU)" if r.get("device_note") == "n/a (CPU)" else "-"
    temp = r.get("peak_temp_bytes")
    return [
        "-" if speedup is None else f"{speedup:.2f}x", *common,
        num(r["median_ms"], ".4g"), f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}", device,
        "-" if dev_speedup is None else f"{dev_speedup:.2f}x", num(r.get("loop_ms"), ".4g"), num(r.get("gbps"), ".1f"),
        num(r.get("tflops"), ".3g"), num(r.get("pct_of_roofline"), ".0f"), num(r.get("device_pct_of_roofline"), ".0f"),
        r.get("bound", "-"), num(r.get("compile_s"), ".2f"), "-" if temp is None else num(temp / 2**20, ".1f"),
    ]


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table, one row per (case, impl), the speedup over the baseline first."""
    body = [_cells(r) for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) if i == 0 else c.ljust(w) for i, (c, w) in enumerate(zip(COLUMNS, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and case_key(r) != prev:
            lines.append("")
        prev = case_key(r)
        lines.append("  ".join(c.rjust(w) if i == 0 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                     .rstrip())
    return "\n".join(lines)


def format_targets(doc: dict, markdown: bool = False) -> str:
    """One line per target: met / missed (with the measured ratio) / not measured."""
    roof = Roofline(**doc["roofline"])
    lines = []
    if markdown:
        lines += ["| target | op, shape, dtype | result |", "| --- | --- | --- |"]
    for t in targets():
        result = evaluate(t, doc["results"], roof)
        where = f"{cases_lib.short_name(t.op)} {'x'.join(map(str, t.shape))} {t.dtype}"
        lines.append(f"| {t.description} | {where} | {result['detail']} |" if markdown
                     else f"  {result['detail']:<42} {t.description}  [{where}]")
    if doc["platform"] == "cpu":
        lines += ["", "The targets apply to GPU only: these are CPU numbers (Pallas in interpret mode), "
                     "which say nothing about speed."]
    return "\n".join(lines)


# What every impl computes, so a row's opponent is known to be fair (tests/test_fair_baseline.py).
PRECISION = ("precision, the same on every impl: f32 rows are IEEE f32 matmuls (Precision.HIGHEST); bf16 rows "
             "take bf16 operands with f32 accumulation in forward and backward (user = jnp.tanh(x @ w + b) and "
             "optax on the bf16 inputs as given)")


def baseline_legend() -> str:
    """One line: what the ``user`` row of each op is (bench/baselines.py)."""
    return "user = the users' code: " + "; ".join(
        f"{cases_lib.short_name(b.op)}: {b.code}" for b in baselines.BASELINES.values()) + \
        f"; {cases_lib.TRAIN_STEP}: SGD on those layers and optax's loss"


def header(doc: dict) -> str:
    """Three lines: the device, the measured ceilings, the precision every impl runs at."""
    r = doc["roofline"]
    return (f"{doc['device']} ({doc['platform']}), jax {doc['jax_version']}, {doc['date']}\n"
            f"measured ceilings: copy {r['hbm_gbps']:.1f} GB/s, bf16 matmul {r['bf16_tflops']:.3g} TFLOP/s, "
            f"f32 matmul (HIGHEST) {r['f32_tflops']:.3g} TFLOP/s\n{PRECISION}")


def summary(doc: dict) -> str:
    """Header, table, skipped peers and targets: what the CLI prints last."""
    legend = ", ".join(f"{a} = {n}" for a, n in cases_lib.ALIASES.items())
    lines = [header(doc), f"speedup = baseline median / impl median (wall clock), the baseline being the faster "
             f"of user and xla; dev speedup = baseline device ms / impl device ms; loop ms = per call of N in one dispatch; * = CUDA events; ! = forward check failed; {legend}", "",
             baseline_legend(), "", format_table(doc["results"]), ""]
    skipped = (doc.get("peers") or {}).get("skipped") or []
    if skipped:
        lines += ["peers skipped:", *(f"  {s['peer']}{' ' + s['op'] if s.get('op') else ''}: {s['reason']}"
                                      for s in skipped), ""]
    return "\n".join([*lines, "targets (GPU, impl pallas):", format_targets(doc)])


def format_peers(doc: dict) -> list[str]:
    """results.md's Peers section: what each peer ran, what it lacks, who was skipped and why,
    and any forward check that failed."""
    record = doc.get("peers")
    if not record:
        return []
    lines = ["", "## Peers", "", f"Requested: `--peers {record.get('requested', 'auto')}`.", ""]
    for peer, ops_run in (record.get("ran") or {}).items():
        missing = (record.get("not_covered") or {}).get(peer) or []
        note = next((r.get("peer_note") for r in doc["results"] if r["impl"] == peer and r.get("peer_note")), "")
        lines.append(f"- {peer}: ran {', '.join(map(cases_lib.short_name, ops_run)) or 'nothing'}"
                     + (f"; no counterpart for {', '.join(map(cases_lib.short_name, missing))}" if missing else "")
                     + (f" ({note})" if note else ""))
    skipped = record.get("skipped") or []
    if skipped:
        lines += ["Skipped:", ""] if lines[-1] == "" else ["", "Skipped:", ""]
        lines += [f"- {s['peer']}{' `' + s['op'] + '`' if s.get('op') else ''}"
                  f"{' ' + s['case'] if s.get('case') else ''}: {s['reason']}" for s in skipped]
    failed = [r for r in doc["results"] if str(r.get("check", "")).startswith("FAILED")]
    if failed:
        lines += ["", "Forward checks that FAILED (their times do not compare):", ""]
        lines += [f"- {r['impl']} {cases_lib.short_name(r['op'])} {'x'.join(map(str, r['shape']))} {r['dtype']} "
                  f"{r['mode']}: {r['check']}" for r in failed]
    return lines


# --- files ----------------------------------------------------------------------------------


def _markdown(doc: dict, notes: Sequence[str]) -> str:
    md_cols = [c if c != "p20-p80 ms" else "p20–p80 ms" for c in COLUMNS]
    lines = ["# fusedvjp benchmark", "", header(doc).replace("\n", "  \n"), "", *[f"- {n}" for n in notes], "",
             "## Results", "", "| " + " | ".join(md_cols) + " |", "|" + " --- |" * len(md_cols)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in doc["results"]]
    lines += format_peers(doc)
    lines += ["", "## Targets (GPU, impl pallas)", "", format_targets(doc, markdown=True)]
    errors = [r for r in doc["results"] if r.get("error")]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['mode']} {r['impl']}: "
                  f"`{r['error']}`" for r in errors]
    return "\n".join(lines) + "\n"


def _finite(obj):
    """Strict JSON: non-finite floats become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def plot_roofline(doc: dict, path: pathlib.Path) -> None:
    """Log-log arithmetic intensity vs achieved TFLOP/s under the measured ceilings, one panel per impl.

    Panels side by side (pallas, user, xla, jnp) on shared axes; colour = op, marker = mode,
    filled = bf16, hollow = f32; each point is labelled with its shape.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    roof = Roofline(**doc["roofline"])
    rows = [r for r in doc["results"] if r.get("median_ms") and r["bytes"] > 0 and r["flops"] > 0]
    impls = [i for i in cases_lib.IMPLS if any(r["impl"] == i for r in rows)] or ["pallas"]
    impls += sorted({r["impl"] for r in rows} - set(impls))
    fig, axes = plt.subplots(1, len(impls), figsize=(6 * len(impls), 5.5), sharex=True, sharey=True, squeeze=False)
    intensities = [r["flops"] / r["bytes"] for r in rows] or [1.0]
    ridge = roof.bf16_tflops * 1e3 / roof.hbm_gbps
    ai = np.geomspace(min(min(intensities), ridge) / 4, max(max(intensities), ridge) * 4, 200)
    colors = {op: f"C{i % 10}" for i, op in enumerate(dict.fromkeys(r["op"] for r in rows))}
    markers = {"fwd+bwd": "o", "fwd": "^"}
    for ax, impl in zip(axes[0], impls):
        for name, peak, style in (("bf16", roof.bf16_tflops, "-"), ("f32 HIGHEST", roof.f32_tflops, "--")):
            ax.plot(ai, np.minimum(ai * roof.hbm_gbps / 1e3, peak), "k" + style, lw=1,
                    label=f"ceiling {name}: {roof.hbm_gbps:.0f} GB/s, {peak:.3g} TFLOP/s")
        for r in (r for r in rows if r["impl"] == impl):
            x, y = r["flops"] / r["bytes"], r["flops"] / (r["median_ms"] * 1e-3) / 1e12
            color = colors[r["op"]]
            ax.plot(x, y, markers.get(r["mode"], "x"), color=color, ms=7,
                    mfc=color if r["dtype"] == "bf16" else "none")
            ax.annotate("x".join(map(str, r["shape"])), (x, y), fontsize=6, xytext=(4, 2), textcoords="offset points")
        ax.set(xscale="log", yscale="log", title=impl, xlabel="arithmetic intensity (flop / byte)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("achieved TFLOP/s")
    for op, color in colors.items():
        axes[0][-1].plot([], [], "s", color=color, label=cases_lib.short_name(op))
    for mode, marker in markers.items():
        axes[0][-1].plot([], [], marker, color="0.3", label=mode)
    axes[0][-1].plot([], [], "o", color="0.3", label="bf16 (filled)")
    axes[0][-1].plot([], [], "o", color="0.3", mfc="none", label="f32 (hollow)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Roofline: {doc['device']} ({doc['platform']}), jax {doc['jax_version']}, {doc['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(doc: dict, out_dir: str | pathlib.Path, notes: Sequence[str] = (), plot: bool = True) -> None:
    """Writes ``results.json``, ``results.md`` and (with ``plot``) ``roofline.png`` to ``out_dir``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    (out / "results.md").write_text(_markdown(doc, notes))
    if plot:
        plot_roofline(doc, out / "roofline.png")
