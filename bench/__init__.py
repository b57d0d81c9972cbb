"""Benchmark of the ops against XLA's autodiff, with a roofline measured in the same run.

* ``python -m fusedvjp.bench [--ops ...] [--shapes mnist,llm] [--dtypes f32,bf16]
  [--modes fwd,fwd+bwd] [--impls pallas,xla,jnp] [--out DIR] [--quick]``: the table
  (speedup over xla first), and results.json / results.md / roofline.png in ``DIR``.
* ``pytest bench --benchmark-only``: the same cases under pytest-benchmark.
* ``bash bench/device_check.sh``: install, GPU tests, full benchmark and MNIST training
  on a GPU machine in under 8 minutes.

Modules: :mod:`~fusedvjp.bench.cases` (what to time, from the op registry),
:mod:`~fusedvjp.bench.timing`, :mod:`~fusedvjp.bench.roofline`, :mod:`~fusedvjp.bench.report`.
CPU numbers (Pallas in interpret mode) say nothing about speed.
"""
