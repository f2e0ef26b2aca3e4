"""Noise injection x_t = alpha[t_b] * x + sigma[t_b] * eps in one elementwise pass.

The per-sample timestep t_b is looked up in the schedule tables inside the kernel, so no (B, 1, 1, 1) coefficient
tensors are built. With `seed` given, eps is drawn in-kernel from Triton's counter-based Philox generator at counter
`offset + flat_index`: eps never exists in memory, and any later kernel given the same (seed, offset) sees the same
eps (philox_randn writes it out, for tests or for a fake-score update that wants to reuse it).

Numerics: computed in fp32 (fp64 for fp64 inputs) and rounded once to x's dtype; in-kernel eps is fp32. The
engine's NoiseSchedule.add_noise instead rounds alpha and sigma to x's dtype first, so bf16 results differ from it
by bf16 rounding (this version is the more accurate of the two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import runs_triton

EPS_NONE, EPS_LOAD, EPS_PHILOX = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# kernels
@triton.jit
def _noise_kernel(x_ptr,        # (B, N) input, any float dtype, contiguous
                  eps_ptr,      # (B, N) noise when EPS_MODE == EPS_LOAD, else unused
                  out_ptr,      # (B, N) output, written in out's dtype
                  t_ptr,        # (B,) integer timestep index per sample
                  a_ptr,        # (T,) table multiplying x (alpha; in backward alpha or sigma)
                  s_ptr,        # (T,) table multiplying eps (sigma)
                  N, seed, offset,
                  EPS_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # grid (cdiv(N, BLOCK), B): the sample index comes from the grid, not from a per-element integer division
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    flat = b * N + offs  # < 2**31, checked by the launcher; also the Philox counter, as in _randn_kernel
    t = tl.load(t_ptr + b)
    y = tl.load(a_ptr + t).to(ACC) * tl.load(x_ptr + flat, mask=mask, other=0.0).to(ACC)
    if EPS_MODE != 0:
        if EPS_MODE == 1:
            e = tl.load(eps_ptr + flat, mask=mask, other=0.0).to(ACC)
        else:
            e = tl.randn(seed, offset + flat).to(ACC)
        y += tl.load(s_ptr + t).to(ACC) * e
    tl.store(out_ptr + flat, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _randn_kernel(out_ptr,      # (total,) fp32 output
                  total, seed, offset, BLOCK: tl.constexpr):
    # the same counters as _noise_kernel's EPS_PHILOX branch, so the values are identical bit for bit
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.randn(seed, offset + offs), mask=offs < total)


# ---------------------------------------------------------------------------------------------------------------
# launchers
def _block(t: torch.Tensor) -> int:
    return 1024 if t.is_cuda else 1 << 16  # the interpreter pays per program, not per element


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_range(total: int, offset: int, batch: int = 1):
    if total + offset >= 2 ** 31:
        raise ValueError(f"noise kernel: offset + numel = {offset + total} does not fit the int32 Philox counter")
    if batch > 65535:  # CUDA's limit on grid axis 1, which carries the sample index
        raise ValueError(f"noise kernel: batch {batch} > 65535; split the batch")


def _launch_noise(x, eps, t, a_tab, s_tab, mode: int, seed: int = 0, offset: int = 0, out_dtype=None):
    B = x.shape[0]
    x = x.contiguous()
    total = x.numel()
    _check_range(total, offset, B)
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    tables = [tab.to(device=x.device, dtype=torch.float32).contiguous() for tab in (a_tab, s_tab)]
    t = t.to(device=x.device, dtype=torch.int32).contiguous()
    if t.shape != (B,):
        raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
    e = eps.contiguous() if mode == EPS_LOAD else x  # any valid pointer; never read
    N = total // max(B, 1)
    blk = min(_block(x), triton.next_power_of_2(max(N, 1)))
    if total:
        _noise_kernel[(triton.cdiv(N, blk), B)](x, e, out, t, tables[0], tables[1], N, int(seed), int(offset),
                                                EPS_MODE=mode, ACC=_acc(x.dtype), BLOCK=blk)
    return out


def philox_randn(shape, seed: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """The eps that add_noise(..., seed=seed, offset=offset) uses for a tensor of this shape (fp32)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    _check_range(out.numel(), offset)
    if not runs_triton(_randn_kernel, out):
        raise RuntimeError("philox_randn needs a CUDA device or TRITON_INTERPRET=1 (there is no torch equivalent "
                           "of Triton's Philox stream)")
    blk = _block(out)
    _randn_kernel[(triton.cdiv(out.numel(), blk),)](out, out.numel(), int(seed), int(offset), BLOCK=blk)
    return out


# ---------------------------------------------------------------------------------------------------------------
# autograd
class _AddNoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, t, alpha, sigma, seed, offset):
        mode = EPS_PHILOX if eps is None else EPS_LOAD
        ctx.save_for_backward(t, alpha, sigma)
        ctx.eps_dtype = None if eps is None else eps.dtype
        return _launch_noise(x, eps, t, alpha, sigma, mode, seed or 0, offset)

    @staticmethod
    def backward(ctx, g):
        t, alpha, sigma = ctx.saved_tensors
        # d x_t / d x = alpha[t_b], d x_t / d eps = sigma[t_b]: the same kernel with no eps term
        gx = _launch_noise(g, None, t, alpha, alpha, EPS_NONE) if ctx.needs_input_grad[0] else None
        ge = None
        if ctx.eps_dtype is not None and ctx.needs_input_grad[1]:
            ge = _launch_noise(g, None, t, sigma, sigma, EPS_NONE, out_dtype=ctx.eps_dtype)
        return gx, ge, None, None, None, None, None


def add_noise(x: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              eps: torch.Tensor | None = None, seed: int | None = None, offset: int = 0) -> torch.Tensor:
    """x_t = alpha[t_b] * x + sigma[t_b] * eps for x (B, ...), t (B,) integer, alpha/sigma (T,) tables.

    Give either eps (same shape as x) or seed (eps drawn in-kernel at Philox counters offset .. offset+numel-1).
    Runs where kernels.runs_triton allows; the eager path is models.schedules.NoiseSchedule.add_noise.
    """
    if (eps is None) == (seed is None):
        raise ValueError("add_noise: give exactly one of eps and seed")
    if eps is not None and eps.shape != x.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} != x shape {tuple(x.shape)}")
    if not runs_triton(_noise_kernel, x):
        raise RuntimeError("add_noise: the Triton kernel runs on CUDA tensors, or on CPU tensors only with "
                           "TRITON_INTERPRET=1 set before kernels.noise is imported")
    return _AddNoise.apply(x, eps, t, alpha, sigma, seed, offset)
