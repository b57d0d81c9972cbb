"""Pallas kernels (forward and backward) behind ``impl="pallas"``.

One package per op, ``kernels/<op>/``: ``__init__.py`` with the launchers
``<op>_fwd(...) -> (out, residuals)`` and ``<op>_bwd(...) -> grads`` and the backend
table, ``common.py`` with the block sizes and the math every backend shares, and one
module per backend (``triton.py``, ``mosaic_tpu.py``, and ``mosaic_gpu.py`` for dense on
Hopper).
"""
