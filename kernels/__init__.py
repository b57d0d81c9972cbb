"""Pallas kernels (forward and backward) behind ``impl="pallas"``.

One file per op: block sizes, forward kernel, backward kernels, launchers
``<op>_fwd(...) -> (out, residuals)`` and ``<op>_bwd(...) -> grads``.
"""
