"""Dense kernels for Hopper (sm_90a) through Pallas Mosaic GPU: TMA loads, wgmma, bf16.

Every kernel is the same warp-specialized persistent matmul with its own operands and
epilogue. A CTA owns an output tile [block_rows, block_cols]; its *memory* warpgroup
streams the operands' reduction steps into a ring of ``max_concurrent_steps`` swizzled
SMEM slots with TMA, and its two *compute* warpgroups each issue wgmma (bf16 operands,
f32 accumulator) for one half of the tile's columns, then run the f32 epilogue, cast
once, and store through SMEM with TMA. The grid is one CTA per SM looping over the
output tiles in ``planar_snake`` order (nearby tiles share operand rows/columns in L2).

  fwd: a  = act(x W + b)   tile [bm, bn], steps over K: x [bm, bk], W [bk, bn]
  dx:  dx = dz W^T         tile [bm, bk], steps over N: dz [bm, bn], W [bk, bn]^T
  dW:  dW = x^T dz         tile [bk, bn], steps over M: x [bm, bk]^T, dz [bm, bn]

Transposed operands are the SMEM tiles read transposed (``ref.T``): wgmma reads 16-bit
operands in either major order, so W and x are never transposed in memory.

Tails: TMA zero-fills the parts of a load box past the array (``OOBFillMode.ZEROS``,
the BlockSpec default) and drops the parts of a store box past it, so a tile that
overhangs the array along any axis is exact: zero rows/columns add nothing to the f32
accumulator, and what the epilogue computes for padding is never written. The arrays
themselves must be whole TMA tiles (``_check_supported``): K and N multiples of 64 and M
of 8 -- 200 x 192 x 320 compiles with 64 x 128 x 64 tiles; 128 x 784 x 512 (MNIST) is refused.

dz = g act'(z) is formed once, by an XLA fusion that reads g and the residual (a for
tanh, z for gelu) and writes dz in bf16 (and db from the f32 dz): 3 M N s bytes.
Recomputing it in the kernels instead would have every CTA of dx (cdiv(K, block_k) per
row block) and of dW (cdiv(K, block_k) per column block) load g and residual tiles
instead of one dz tile: 2 M N s (P + P') bytes against 3 M N s + M N s (P + P'), so the
pass wins for P + P' > 3 -- every shape with K above three tiles (32 at
8192x4096x4096) -- and the compute warpgroups issue only wgmma.

``"gelu_exact"`` is refused by the forward (the warpgroup lowering has no layout rule for
``math.erf``); its backward is served (the erf is in the XLA dz fusion).

bf16 only: wgmma has no IEEE f32 path, so f32 (and shapes TMA cannot address) raise
``NotImplementedError`` at trace time and the dispatcher falls back to Triton.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.dense.common import KERNELS, activate, dz as dz_of, saves_preactivation

# Hopper: the shared memory one CTA may opt into (227 KiB). The persistent grid is one
# CTA per SM (`_common.num_sms()`: the device's, or the compile target's).
SMEM_BYTES = 227 * 1024
# Two compute warpgroups split a CTA tile's columns; a third one issues the TMA loads.
COMPUTE_WGS = 2
# 128-byte swizzle rows are 64 bf16; wgmma's M is also 64 rows a warpgroup instruction,
# so every block side is a multiple of this.
SWIZZLE_ELEMS = 64
# Epilogue store tiles [64, 64] bf16 (8 KiB), double-buffered per warpgroup.
EPI_TILE = 64
# TMA boxes are tiled in 8-row groups (the swizzle pattern repeats every 8 rows).
TMA_ROWS = 8
# The memory warpgroup only issues TMA; registers it gives up go to the compute ones.
MEMORY_REGISTERS = 40
# A compute warpgroup's f32 accumulator [rows, cols / 2] costs rows * cols / 256
# registers a thread; 128 leaves room for the epilogue below the 255 ceiling.
MAX_ACC_REGISTERS = 128
# gelu's epilogue (a tanh and a cubic, and z kept for the residual) needs more:
# at 128 accumulator registers (128 x 256 tiles) the forward spills (ptxas, H100, 8192 x
# 4096 x 4096: 80 B of spill stores a thread without z, 48 B with it); at 64 (128 x 128)
# it does not (168 registers at launch, 0 B).
MAX_GELU_ACC_REGISTERS = 64


# --- block sizes -------------------------------------------------------------------------------


def _axes(kernel: str) -> tuple[str, str, str]:
    """(rows, columns, reduction) of ``kernel``'s output tile, by problem axis."""
    return {"fwd": ("m", "n", "k"), "dx": ("m", "k", "n"), "dw": ("k", "n", "m")}[kernel]


@dataclasses.dataclass(frozen=True)
class DenseMosaicGpuBlockSizes:
    """The tiles of one Mosaic GPU dense kernel, named by problem axis.

    Each kernel reads them by its own axes (see the module docstring): the output tile is
    [rows, cols] and the reduction steps by the third. fwd: rows ``block_m``, cols
    ``block_n``, steps ``block_k``; dx: ``block_m``, ``block_k``, ``block_n``; dW:
    ``block_k``, ``block_n``, ``block_m``.

    Attributes:
      block_m, block_n, block_k: multiples of 64 (wgmma rows, 128-byte swizzle rows);
        the output column side a multiple of 128 (two warpgroups of 64-column halves).
      max_concurrent_steps: TMA ring depth (SMEM slots of both operands).
      grid_tile_width: output tiles per band of the planar-snake tile order.
    """

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_tile_width: int = 8

    def __post_init__(self):
        _common.validate_block_fields(
            self, ("block_m", "block_n", "block_k", "max_concurrent_steps", "grid_tile_width")
        )
        blocks = ("block_m", "block_n", "block_k")
        bad = [f"{f}={getattr(self, f)}" for f in blocks if getattr(self, f) % SWIZZLE_ELEMS]
        if bad:
            raise ValueError(f"{type(self).__name__} blocks must be multiples of 64; got {', '.join(bad)}")

    def tiles(self, kernel: str) -> tuple[int, int, int]:
        """(rows, cols, reduction step) of ``kernel``'s CTA tile."""
        return tuple(getattr(self, f"block_{axis}") for axis in _axes(kernel))

    def smem_bytes(self, kernel: str) -> int:
        """Operand ring (both operands, every slot) plus the epilogue buffers, in bytes (bf16)."""
        rows, cols, step = self.tiles(kernel)
        ring = self.max_concurrent_steps * (rows * step + step * cols) * 2
        return ring + COMPUTE_WGS * 2 * EPI_TILE * EPI_TILE * 2 + (cols * 2 if kernel == "fwd" else 0)

    def check_kernel(self, kernel: str) -> None:
        rows, cols, _ = self.tiles(kernel)
        name = type(self).__name__
        if cols % (COMPUTE_WGS * SWIZZLE_ELEMS):
            raise ValueError(f"{name}: the {kernel} kernel's column block ({cols}) must be a multiple of 128")
        if rows * cols // 256 > MAX_ACC_REGISTERS:
            raise ValueError(
                f"{name}: the {kernel} kernel's tile {rows}x{cols} needs {rows * cols // 256} accumulator "
                f"registers a thread, more than {MAX_ACC_REGISTERS}"
            )
        if self.smem_bytes(kernel) > SMEM_BYTES:
            raise ValueError(
                f"{name}: the {kernel} kernel needs {self.smem_bytes(kernel)} bytes of shared memory, "
                f"more than the {SMEM_BYTES} an H100 CTA has"
            )

    @classmethod
    def default(cls, m: int, n: int, k: int, dtype, kernel: str = "fwd",
                activation: str | None = None) -> DenseMosaicGpuBlockSizes:
        """Tiles of ``kernel`` ("fwd", "dx" or "dw") for an [M, K] @ [K, N] problem.

        Evidence: static compile for H100 sm_90a only, no GPU measurement exists (jax
        0.11.2, ptxas 13.5, 8192 x 4096 x 4096 bf16): a 128 x 256 CTA tile (two compute
        warpgroups of 128 x 128, 128 f32 accumulator registers a thread), 64-deep steps and a
        4-slot ring -- the tile JAX's Hopper matmul example tunes around -- compiles for
        fwd, dx and dW to 168 registers at launch (setmaxnreg: 232 compute, 40 memory),
        no spills, 224-225 KiB SMEM, 8 HGMMA.64x128x16 in a 57-instruction K step.
        Smaller problems halve the tile (down to 64 x 128) until the grid covers the SMs.
        The gelu forward starts at 128 x 128 (``MAX_GELU_ACC_REGISTERS``).
        """
        if kernel not in KERNELS:
            raise ValueError(f"unknown dense kernel {kernel!r}; expected one of {KERNELS}")
        tuned = _common.tuned_block_sizes(cls, f"dense_{kernel}", (m, n, k), dtype, "mosaic_gpu")
        if tuned is not None:
            return tuned
        rows, cols, step = _axes(kernel)
        size = dict(m=m, n=n, k=k)
        tile = {rows: 128, cols: 128 if kernel == "fwd" and saves_preactivation(activation) else 256, step: 64}
        while pl.cdiv(size[rows], tile[rows]) * pl.cdiv(size[cols], tile[cols]) < _common.num_sms():
            if tile[cols] > 128:
                tile[cols] //= 2
            elif tile[rows] > 64:
                tile[rows] //= 2
            else:
                break
        return cls(block_m=tile["m"], block_n=tile["n"], block_k=tile["k"])


def default_block_sizes(m: int, n: int, k: int, dtype, kernel: str) -> DenseMosaicGpuBlockSizes:
    return DenseMosaicGpuBlockSizes.default(m, n, k, dtype, kernel)


def _resolve(block_sizes, m: int, n: int, k: int, dtype, kernel: str,
             activation: str | None = None) -> DenseMosaicGpuBlockSizes:
    if block_sizes is None:
        bs = DenseMosaicGpuBlockSizes.default(m, n, k, dtype, kernel, activation)
    elif isinstance(block_sizes, DenseMosaicGpuBlockSizes):
        bs = block_sizes
    else:
        raise NotImplementedError(
            f"the Mosaic GPU dense kernels take DenseMosaicGpuBlockSizes tiles, not {type(block_sizes).__name__}"
        )
    bs.check_kernel(kernel)
    rows, cols, _ = bs.tiles(kernel)
    if kernel == "fwd" and saves_preactivation(activation) and rows * cols // 256 > MAX_GELU_ACC_REGISTERS:
        raise ValueError(
            f"{type(bs).__name__}: the {activation} forward's tile {rows}x{cols} needs {rows * cols // 256} "
            f"accumulator registers a thread, more than the {MAX_GELU_ACC_REGISTERS} its epilogue leaves room for"
        )
    return bs


def _check_supported(x, w, *arrays, interpret: bool) -> None:
    """Refusals (trace time): a GPU that is not a Hopper; any dtype but bf16; dimensions
    the TMA descriptors cannot tile."""
    if not interpret and not _common.is_hopper():
        raise NotImplementedError(
            f"the Mosaic GPU dense kernels need a Hopper GPU (sm_90a: TMA, wgmma); tracing for "
            f"{_common.device_kind()!r}"
        )
    for t in (x, w, *arrays):
        if jnp.dtype(t.dtype) != jnp.bfloat16:
            raise NotImplementedError(
                f"Mosaic GPU dense kernels take bfloat16 only (wgmma has no IEEE f32 path), got {t.dtype}"
            )
    (m, k), n = x.shape, w.shape[1]
    # Mosaic GPU builds each TMA descriptor from the whole GMEM array tiled like its SMEM
    # tile (8 rows x one 64-element swizzle row), and refuses an array whose dims are not
    # multiples of that tile ("dimension 1 must have size smaller or a multiple of its
    # tiling 64, but got 784", jax 0.11.2). K and N are minor dims of some operand, and M,
    # K, N all major dims of one. Mixing narrower swizzles per operand (K % 16 would admit
    # 784) fails Mosaic's layout inference for wgmma. Tiles past the array's edge are fine.
    if k % SWIZZLE_ELEMS or n % SWIZZLE_ELEMS or m % TMA_ROWS:
        raise NotImplementedError(
            f"Mosaic GPU dense kernels need K and N multiples of {SWIZZLE_ELEMS} and M a multiple of "
            f"{TMA_ROWS} (whole TMA tiles); got M={m}, K={k}, N={n}"
        )


# --- the pipelined matmul -------------------------------------------------------------------


def _smem_transforms():
    """TMA tiling (8 rows x 64 elements) + 128-byte swizzle of every SMEM tile."""
    return (plgpu.TilingTransform((8, SWIZZLE_ELEMS)), plgpu.SwizzleTransform(SWIZZLE_ELEMS * 2))


def _matmul_kernel(
    lhs_gmem, rhs_gmem, *refs, lhs_t, rhs_t, rows, cols, step, out_rows, out_cols, reduce_len, bs, epilogue,
    has_bias,
):
    """CTA tile [rows, cols] of out = lhs @ rhs; 2 compute warpgroups x [rows, cols / 2].

    lhs tiles are [rows, step] ([step, rows] read transposed if ``lhs_t``); rhs tiles are
    [step, cols] ([cols, step] read transposed if ``rhs_t``). Grid: one CTA per SM.
    ``epilogue`` maps the f32 tile to one value per output ref (the forward with
    gelu's residual has two: a and z).
    """
    refs = list(refs)
    b_gmem = refs.pop(0) if has_bias else None
    out_gmems = refs  # one shape and dtype
    wg_cols = cols // COMPUTE_WGS
    lhs_block = (step, rows) if lhs_t else (rows, step)
    rhs_block = (cols, step) if rhs_t else (step, cols)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(pl.cdiv(reduce_len, step),),
            memory_registers=MEMORY_REGISTERS,
            in_specs=[
                plgpu.BlockSpec(lhs_block, (lambda s: (s, 0)) if lhs_t else (lambda s: (0, s)),
                                transforms=_smem_transforms(),
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec(rhs_block, (lambda s: (0, s)) if rhs_t else (lambda s: (s, 0)),
                                transforms=_smem_transforms(),
                                memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=COMPUTE_WGS,
            max_concurrent_steps=bs.max_concurrent_steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # the allocations do not depend on the bodies
    scratch = dict(
        pipeline_allocs=pipeline(ignore, ignore).get_allocations(lhs_gmem, rhs_gmem),
        # Epilogue tiles, two slots per warpgroup: one is stored while the next fills.
        out_smem=plgpu.SMEM((COMPUTE_WGS, 2, EPI_TILE, EPI_TILE), out_gmems[0].dtype,
                            transforms=_smem_transforms()),
    )
    if has_bias:
        scratch.update(b_smem=plgpu.SMEM((COMPUTE_WGS, wg_cols), b_gmem.dtype),
                       b_barrier=plgpu.Barrier(num_barriers=COMPUTE_WGS))

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(pipeline_allocs, out_smem, b_smem=None, b_barrier=None):
        wg = lax.axis_index("wg")
        tiles = (pl.cdiv(out_rows, rows), pl.cdiv(out_cols, cols))

        @plgpu.nd_loop((tiles[0] * tiles[1],), collective_axes="sm")
        def _tile_loop(loop_info):
            (lin,) = loop_info.index
            ri, ci = plgpu.planar_snake(lin, tiles, 1, bs.grid_tile_width)
            row_ds, col_ds = pl.ds(ri * rows, rows), pl.ds(ci * cols, cols)
            wg_ds = pl.ds(wg * wg_cols, wg_cols)

            def compute_context(run_pipeline):
                if has_bias:  # issued first: lands while the K loop runs
                    plgpu.copy_gmem_to_smem(b_gmem.at[col_ds].at[wg_ds], b_smem.at[wg], b_barrier.at[wg])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((rows, wg_cols), jnp.float32))
                def _acc_scope(acc_ref):
                    run_pipeline(acc_ref)
                    b = None
                    if has_bias:
                        plgpu.barrier_wait(b_barrier.at[wg])
                        b = b_smem[wg]
                    outs = [o.astype(out_gmems[0].dtype) for o in epilogue(acc_ref[...], b)]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's stores read out_smem
                    out_tiles = [o.at[row_ds, col_ds].at[:, wg_ds] for o in out_gmems]
                    n_epi = wg_cols // EPI_TILE
                    # Several outputs take turns in the same two slots: no extra SMEM.
                    stores = [(ei, ej, o) for ei in range(rows // EPI_TILE) for ej in range(n_epi)
                              for o in range(len(outs))]
                    for slot_count, (ei, ej, o) in enumerate(stores):
                        slot = slot_count % 2
                        epi = (pl.ds(ei * EPI_TILE, EPI_TILE), pl.ds(ej * EPI_TILE, EPI_TILE))
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        out_smem[wg, slot] = outs[o][epi]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_tiles[o].at[epi])

            def mma_body(_, lhs_smem, rhs_smem, acc_ref):
                lhs = lhs_smem.T if lhs_t else lhs_smem
                rhs = rhs_smem.at[wg_ds, :].T if rhs_t else rhs_smem.at[:, wg_ds]
                plgpu.wgmma(acc_ref, lhs, rhs)
                plgpu.wgmma_wait(0)
                return acc_ref

            lhs_cta = lhs_gmem.at[:, row_ds] if lhs_t else lhs_gmem.at[row_ds, :]
            rhs_cta = rhs_gmem.at[col_ds, :] if rhs_t else rhs_gmem.at[:, col_ds]
            pipeline(mma_body, compute_context)(lhs_cta, rhs_cta, allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store issued before exit


def _launch(kernel, lhs, rhs, *b, out_shape, lhs_t, rhs_t, bs, epilogue, name, interpret, num_outputs=1):
    out_rows, out_cols = out_shape
    rows, cols, step = bs.tiles(kernel)
    reduce_len = lhs.shape[0] if lhs_t else lhs.shape[1]
    n_tiles = pl.cdiv(out_rows, rows) * pl.cdiv(out_cols, cols)
    body = functools.partial(
        _matmul_kernel, lhs_t=lhs_t, rhs_t=rhs_t, rows=rows, cols=cols, step=step, out_rows=out_rows,
        out_cols=out_cols, reduce_len=reduce_len, bs=bs, epilogue=epilogue, has_bias=bool(b),
    )
    out = _common.out_struct(out_shape, lhs.dtype)
    return plgpu.kernel(
        body,
        out_type=(out,) * num_outputs if num_outputs > 1 else out,
        grid=(min(n_tiles, _common.num_sms()),),
        grid_names=("sm",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
    )(lhs, rhs, *b)


# --- launchers ----------------------------------------------------------------------------


def fwd(x, w, *b, activation, block_sizes, interpret, write_z=False):
    """a, or (a, z) with ``write_z`` (the pre-activation, gelu's residual)."""
    if activation == "gelu_exact":
        raise NotImplementedError(
            "the Mosaic GPU dense forward does not take activation='gelu_exact': Mosaic GPU's warpgroup "
            "lowering has no layout inference rule for math.erf (jax 0.11.2)"
        )
    _check_supported(x, w, *b, interpret=interpret)
    (m, k), n = x.shape, w.shape[1]
    bs = _resolve(block_sizes, m, n, k, x.dtype, "fwd", activation)

    def epilogue(z, b_tile):  # z = x W (+ b) in f32; a = act(z) (and z), cast at the store
        if b_tile is not None:
            z = z + lax.broadcast_in_dim(b_tile.astype(jnp.float32), z.shape, [1])
        return (activate(z, activation), z) if write_z else (activate(z, activation),)

    return _launch("fwd", x, w, *b, out_shape=(m, n), lhs_t=False, rhs_t=False, bs=bs, epilogue=epilogue,
                   name="fusedvjp_dense_fwd_mgpu", interpret=interpret, num_outputs=2 if write_z else 1)


def bwd(x, w, g, *r, activation, has_bias, block_sizes, interpret):
    """``r``: the residual (a for tanh, z for gelu), absent without an activation."""
    _check_supported(x, w, g, *r, interpret=interpret)
    (m, k), n = x.shape, w.shape[1]
    dx_bs = _resolve(getattr(block_sizes, "dx", block_sizes), m, n, k, x.dtype, "dx")
    dw_bs = _resolve(getattr(block_sizes, "dw", block_sizes), m, n, k, x.dtype, "dw")
    # The dz pass (see the module docstring): one XLA fusion, dz rounded to bf16 for the
    # tensor cores as XLA's bf16 autodiff rounds it; db sums the f32 dz.
    dz32 = dz_of(g, r[0] if r else None, activation)
    dz = dz32.astype(g.dtype)
    db = jnp.sum(dz32, axis=0).astype(w.dtype) if has_bias else None
    plain = lambda acc, _: (acc,)
    dx = _launch("dx", dz, w, out_shape=(m, k), lhs_t=False, rhs_t=True, bs=dx_bs, epilogue=plain,
                 name="fusedvjp_dense_bwd_dx_mgpu", interpret=interpret)
    dw = _launch("dw", x, dz, out_shape=(k, n), lhs_t=True, rhs_t=False, bs=dw_bs, epilogue=plain,
                 name="fusedvjp_dense_bwd_dw_mgpu", interpret=interpret)
    return dx, dw, db
