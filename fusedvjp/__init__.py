"""fusedvjp: fused JAX Pallas kernels with hand-written backward passes.

Subpackages: ``fusedvjp.ops`` (the public ops), ``fusedvjp.kernels`` (the Pallas
kernels behind ``impl="pallas"``), ``fusedvjp.model`` (the MNIST MLP) and
``fusedvjp.bench`` (timings against XLA's autodiff).
"""

__version__ = "0.1.0"
