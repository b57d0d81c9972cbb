"""The backend seam: per-platform choice, refusals, and the quiet Triton params."""

import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from conftest import KERNEL_CUSTOM_CALL, lower_for
from fusedvjp.kernels import _common


def _copy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2


def _triton(x, *, interpret):
    return pl.pallas_call(_copy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret,
                          compiler_params=_common.triton_params(4, 1), name="fusedvjp_test_double")(x)


def _tpu_refuses(x, *, interpret):
    raise NotImplementedError("too big for VMEM (test)")


def test_refusal_on_another_platform_keeps_this_ones_kernel():
    f = lambda x: _common.platform_dispatch({"triton": _triton, "mosaic_tpu": _tpu_refuses}, x)  # noqa: E731
    x = jnp.arange(16.0)
    assert jnp.array_equal(jax.jit(f)(x), 2 * x)  # cpu interprets triton
    text = lower_for("cuda", f, jax.ShapeDtypeStruct((16,), jnp.float32))
    assert KERNEL_CUSTOM_CALL["cuda"] in text


def test_refusal_on_the_target_platform_raises_with_the_reason():
    f = lambda x: _common.platform_dispatch({"triton": _triton, "mosaic_tpu": _tpu_refuses}, x, op_name="t")  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"t has no Pallas kernel for this case on tpu: mosaic_tpu: too big"):
        lower_for("tpu", f, jax.ShapeDtypeStruct((16,), jnp.float32))
    with pytest.raises(NotImplementedError, match="on cpu: mosaic_tpu: too big"):
        _common.platform_dispatch({"mosaic_tpu": _tpu_refuses}, jnp.ones(3), backend="mosaic_tpu")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        _common.platform_dispatch({"triton": _triton}, jnp.ones(3), backend="cuda")


def test_triton_deprecation_is_silenced_for_our_kernels_only():
    f = lambda x: _common.platform_dispatch({"triton": _triton}, x)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lower_for("cuda", f, jax.ShapeDtypeStruct((16,), jnp.float32))
    assert not [w for w in caught if "Pallas Triton backend is deprecated" in str(w.message)]

    def theirs(x):
        return pl.pallas_call(_copy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lower_for("cuda", theirs, jax.ShapeDtypeStruct((16,), jnp.float32))
    assert [w for w in caught if "Pallas Triton backend is deprecated" in str(w.message)]


def _abstract_gpu(kind: str, sms: int):
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    return use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind=kind, num_cores=sms, platform="gpu")))


def test_sm_count_comes_from_the_gpu_traced_for():
    from fusedvjp.kernels.dense.mosaic_gpu import DenseMosaicGpuBlockSizes

    assert _common.num_sms() == _common.INTERPRET_SMS  # this CPU: no GPU known
    # fwd at M=1024, N=2048: 128x256 tiles are 8x8 = 64 CTAs; halving the columns gives
    # 128, enough for an H20's 78 SMs, but an H100's 132 needs the rows halved too.
    for kind, sms, tile in (("NVIDIA H20", 78, (128, 128)), ("NVIDIA H100 80GB HBM3", 132, (64, 128))):
        with _abstract_gpu(kind, sms):
            assert _common.num_sms() == sms
            assert DenseMosaicGpuBlockSizes.default(1024, 2048, 512, jnp.bfloat16).tiles("fwd")[:2] == tile
