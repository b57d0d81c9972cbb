"""Benchmark of the ops against their users' code compiled by XLA, with a roofline measured in the same run.

* ``python -m fusedvjp.bench [--ops ...] [--shapes mnist,llm] [--dtypes f32,bf16]
  [--modes fwd,fwd+bwd] [--impls pallas,user,xla,jnp] [--out DIR] [--quick]``: the table
  (speedup over the baseline first: the faster of ``user`` and ``xla``), and results.json /
  results.md / roofline.png in ``DIR``.
* ``pytest bench --benchmark-only``: the same cases under pytest-benchmark.
* ``python -m fusedvjp.bench.sweep``: the block-size sweep that writes the tuning table.
* ``bash bench/device_check.sh``: install, GPU tests, sweep, the benchmark with the peers
  and MNIST training on a GPU machine in under 8 minutes.

Modules: :mod:`~fusedvjp.bench.cases` (what to time, from the op registry),
:mod:`~fusedvjp.bench.measure` (one case: wall clock, device time, loops, peers),
:mod:`~fusedvjp.bench.timing`, :mod:`~fusedvjp.bench.devtime` (device time from a profiler
trace), :mod:`~fusedvjp.bench.peers`, :mod:`~fusedvjp.bench.roofline`,
:mod:`~fusedvjp.bench.report`, :mod:`~fusedvjp.bench.sweep`, :mod:`~fusedvjp.bench.baselines`
(the users' code each op is timed against), :mod:`~fusedvjp.bench.passes` (full passes over
the large array in an optimized HLO).
CPU numbers (Pallas in interpret mode) say nothing about speed.
"""
