"""Device time: what the accelerator spent on each timed call, read from a profiler trace.

A call timed on the host and ended by ``block_until_ready`` measures dispatch as much as
the kernels: for an MNIST-sized kernel (microseconds) mostly dispatch. So the benchmark
also runs each row's calls under ``jax.profiler`` and reads the kernels off the trace:

* each call runs inside a host annotation ``fusedvjp_call|<label>|<i>`` (a
  ``jax.profiler.TraceAnnotation``) and is waited for before the next starts, so the
  kernels a call launched all start inside its annotation's window;
* jax 0.11.2's ``stop_trace`` writes ``plugins/profile/<run>/<host>.trace.json.gz``
  (Chrome trace JSON, ``ts``/``dur`` in microseconds; ``create_perfetto_trace=True`` only
  adds a copy without the metadata). Device work lives in processes named
  ``/device:GPU:<n>`` (``/device:TPU:<n>``); on a GPU each CUDA stream is a thread named
  ``Stream #<id>(<event kinds>)`` holding one complete event (``ph: "X"``) per kernel or
  memcpy, from CUPTI; a TPU's kernels are on its ``XLA Ops`` line. Other lines of a device
  process (``XLA Modules``, ``Steps``, name scopes) summarize the same time and are skipped;
* a call's device time is the union of its device events' intervals (concurrent streams
  are not counted twice); its span runs from the first event's start to the last's end.

On CPU there is no device process: device time is None ("n/a (CPU)").
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

ANNOTATION = "fusedvjp_call"
_DEVICE_PROCESS = re.compile(r"^/device:(GPU|TPU):\d+")
_GPU_STREAM = re.compile(r"^Stream #\d+")
_TPU_OPS_LINE = "XLA Ops"


@dataclasses.dataclass(frozen=True)
class CallDevice:
    """Device events of one timed call (microseconds).

    Attributes:
      busy_us: union of the events' intervals.
      span_us: first start to last end (busy plus the gaps between kernels).
      events: how many kernels / copies ran.
    """

    busy_us: float
    span_us: float
    events: int


def _union_length(intervals: Sequence[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def device_lanes(events: Iterable[Mapping[str, Any]]) -> set[tuple[Any, Any]]:
    """The (pid, tid) pairs that hold device kernels (see the module docstring)."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = (e.get("args") or {}).get("name", "")
        if e.get("name") == "process_name":
            processes[e.get("pid")] = name
        elif e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = name
    lanes = set()
    for (pid, tid), name in threads.items():
        m = _DEVICE_PROCESS.match(processes.get(pid, ""))
        if m and (_GPU_STREAM.match(name) if m.group(1) == "GPU" else name == _TPU_OPS_LINE):
            lanes.add((pid, tid))
    return lanes


def parse_trace(doc: Mapping[str, Any]) -> dict[str, list[CallDevice | None]]:
    """Per-call device time from a Chrome-trace document written by ``jax.profiler``.

    Args:
      doc: the parsed ``*.trace.json.gz`` (``{"traceEvents": [...]}``).

    Returns:
      ``{label: [per call, in call order]}`` for every ``fusedvjp_call|label|i``
      annotation; an entry is None when the trace holds no device lanes at all (CPU),
      and ``CallDevice(0, 0, 0)`` for a call that launched nothing.
    """
    events = doc.get("traceEvents") or []
    lanes = device_lanes(events)
    windows = []  # (start_us, label, index)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name.startswith(ANNOTATION + "|") and name.count("|") >= 2:
            label, index = name[len(ANNOTATION) + 1:].rsplit("|", 1)
            windows.append((float(e["ts"]), label, int(index)))
    windows.sort()
    per_window: list[list[tuple[float, float]]] = [[] for _ in windows]
    starts = np.array([w[0] for w in windows], np.float64)
    if lanes and windows:
        for e in events:
            if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) not in lanes:
                continue
            start = float(e["ts"])
            i = int(np.searchsorted(starts, start, side="right")) - 1
            if i >= 0:  # before the first call: warm-up work
                per_window[i].append((start, start + float(e.get("dur", 0.0))))
    out: dict[str, dict[int, CallDevice | None]] = {}
    for (_, label, index), intervals in zip(windows, per_window):
        if not lanes:
            value = None
        elif intervals:
            span = max(e for _, e in intervals) - min(s for s, _ in intervals)
            value = CallDevice(_union_length(intervals), span, len(intervals))
        else:
            value = CallDevice(0.0, 0.0, 0)
        out.setdefault(label, {})[index] = value
    return {label: [calls[i] for i in sorted(calls)] for label, calls in out.items()}


def read_trace_dir(log_dir: str | pathlib.Path) -> dict[str, Any]:
    """The newest ``plugins/profile/*/*.trace.json.gz`` under ``log_dir``, parsed (not the
    ``perfetto_trace.json.gz`` copy)."""
    files = [p for p in pathlib.Path(log_dir).glob("plugins/profile/*/*.trace.json.gz")
             if p.name != "perfetto_trace.json.gz"]
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}/plugins/profile")
    with gzip.open(max(files, key=lambda p: p.stat().st_mtime_ns), "rt", encoding="utf-8") as f:
        return json.load(f)


def profile_calls(runs: Mapping[str, Callable[[int], Any]], n_calls: int) -> dict[str, list[CallDevice | None]]:
    """Runs each ``runs[label](i)`` for ``i < n_calls`` under the profiler; per-call device time.

    Args:
      runs: label -> a function running call ``i`` and waiting for it (it must block:
        the windows assume each call ends before the next starts).
      n_calls: calls per label.

    Returns:
      As :func:`parse_trace`; labels whose calls raised are absent.
    """
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames would only slow the calls down
    options.enable_hlo_proto = False
    log_dir = tempfile.mkdtemp(prefix="fusedvjp-trace-")
    try:
        jax.profiler.start_trace(log_dir, profiler_options=options)
        try:
            for label, run in runs.items():
                for i in range(n_calls):
                    with jax.profiler.TraceAnnotation(f"{ANNOTATION}|{label}|{i}"):
                        run(i)
        finally:
            jax.profiler.stop_trace()
        return parse_trace(read_trace_dir(log_dir))
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def summarize(calls: Sequence[CallDevice | None]) -> dict[str, Any] | None:
    """``device_ms`` (median busy time), ``device_p20_ms``, ``device_p80_ms``,
    ``device_span_ms`` (median span) and ``device_kernels`` (median events per call); None
    without device events."""
    calls = [c for c in calls if c is not None]
    if not calls or all(c.events == 0 for c in calls):
        return None
    busy = np.array([c.busy_us for c in calls]) * 1e-3
    p50, p20, p80 = np.percentile(busy, [50, 20, 80])
    return {"device_ms": float(p50), "device_p20_ms": float(p20), "device_p80_ms": float(p80),
            "device_span_ms": float(np.median([c.span_us for c in calls]) * 1e-3),
            "device_kernels": int(np.median([c.events for c in calls]))}
