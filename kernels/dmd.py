"""The DMD gradient and loss (DMD Eq. 7-8) with one read of x, pred_real and pred_fake.

Same meaning, value and gradient as engine.losses.distribution_matching_loss (the reference the tests compare
against; with guidance, applied to the guided prediction):
    norm_b = mean_{c,h,w} |x - pred_real|                         (per sample)
    grad   = (pred_fake - pred_real) / norm_b, a sample zeroed when norm_b is 0 or non-finite or grad has a
             non-finite entry
    loss   = 0.5 * mean(grad^2),   d loss / d x = grad / x.numel()
Optionally pred_real is the classifier-free-guidance mix uncond + scale * (cond - uncond), formed in registers.

Kernels: forward is a split reduction (grid B x SPLIT, so small batches still fill the GPU) writing four partials per
program, then a one-program finalise that turns them into per-sample 1/norm (0 for a rejected sample) and the loss.
Backward is one elementwise pass (pred_fake - pred_real) * inv_norm_b * grad_output / numel. Nothing of size x is
saved or written in forward.

Numerics: fp32 maths for fp32/bf16/fp16 inputs, fp64 maths for fp64 inputs (also in the kernels). The loss is
0.5 * sum_b(sum (pf - pr)^2 * inv_b^2) / numel, which is the reference's 0.5 * mse(x, x - grad) without its
cancellation; an fp32 sum of squares overflows only for |pred_fake - pred_real| beyond ~1e19. The guidance scale
reaches the kernels as an fp32 scalar (Triton's float arguments are fp32), also for fp64 inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import runs_triton


# ---------------------------------------------------------------------------------------------------------------
# kernels
@triton.jit
def _dmd_stats_kernel(x_ptr,    # (B, N) generator samples
                      pr_ptr,   # (B, N) real-score prediction (the conditional one when HAS_CFG)
                      pu_ptr,   # (B, N) unconditional real-score prediction when HAS_CFG, else unused
                      pf_ptr,   # (B, N) fake-score prediction
                      part_ptr,  # (4, B, SPLIT) ACC: sum|x-pr|, sum (pf-pr)^2 of finite entries, max|pf-pr|, #non-finite
                      N, CHUNK, B, SPLIT, scale,
                      HAS_CFG: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    sp = tl.program_id(1)
    base = b.to(tl.int64) * N
    start = sp * CHUNK
    s_abs = tl.zeros((BLOCK,), ACC)
    s_sq = tl.zeros((BLOCK,), ACC)
    m_abs = tl.zeros((BLOCK,), ACC)
    n_bad = tl.zeros((BLOCK,), ACC)
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        mask = (idx < N) & (i + tl.arange(0, BLOCK) < CHUNK)
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        pr = tl.load(pr_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        if HAS_CFG:
            pu = tl.load(pu_ptr + base + idx, mask=mask, other=0.0).to(ACC)
            pr = pu + scale * (pr - pu)
        pf = tl.load(pf_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        d = pf - pr
        finite = tl.abs(d) < float("inf")  # false for inf and NaN
        s_abs += tl.abs(x - pr)  # masked lanes load zeros, adding 0
        d0 = tl.where(finite, d, 0.0)
        s_sq += d0 * d0
        m_abs = tl.maximum(m_abs, tl.abs(d0))
        n_bad += tl.where(finite, 0.0, 1.0)  # masked lanes have d = 0, finite
    out = part_ptr + b * SPLIT + sp
    tl.store(out, tl.sum(s_abs, axis=0))
    tl.store(out + B * SPLIT, tl.sum(s_sq, axis=0))
    tl.store(out + 2 * B * SPLIT, tl.max(m_abs, axis=0))
    tl.store(out + 3 * B * SPLIT, tl.sum(n_bad, axis=0))


@triton.jit
def _dmd_finalize_kernel(part_ptr,  # (4, B, SPLIT) partials from _dmd_stats_kernel
                         inv_ptr,   # (B,) out: 1 / norm_b, or 0 for a rejected sample
                         loss_ptr,  # (1,) out: 0.5 * mean(grad^2)
                         B, SPLIT, N, numel,
                         ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    cols = tl.arange(0, BLOCK_S)[None, :]
    loss = tl.zeros((BLOCK_B,), ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        m = (rows[:, None] < B) & (cols < SPLIT)
        p = part_ptr + rows[:, None] * SPLIT + cols
        s_abs = tl.sum(tl.load(p, mask=m, other=0.0), axis=1)
        s_sq = tl.sum(tl.load(p + B * SPLIT, mask=m, other=0.0), axis=1)
        m_abs = tl.max(tl.load(p + 2 * B * SPLIT, mask=m, other=0.0), axis=1)
        n_bad = tl.sum(tl.load(p + 3 * B * SPLIT, mask=m, other=0.0), axis=1)
        norm = s_abs / N
        inv = 1.0 / norm
        # a NaN norm fails both comparisons; max|d| * inv is the largest |grad| entry, so it catches overflow
        ok = (n_bad == 0) & (norm > 0) & (norm < float("inf")) & (m_abs * inv < float("inf"))
        inv = tl.where(ok, inv, 0.0)
        loss += tl.where(ok, s_sq * inv * inv, 0.0)
        tl.store(inv_ptr + rows, inv, mask=rows < B)
    # divide by the integer numel: a float argument would reach the kernel as fp32 and cost fp64 its precision
    tl.store(loss_ptr, 0.5 * tl.sum(loss, axis=0) / numel)


@triton.jit
def _dmd_grad_kernel(pr_ptr,    # (B, N) real-score prediction (conditional one when HAS_CFG)
                     pu_ptr,    # (B, N) unconditional prediction when HAS_CFG, else unused
                     pf_ptr,    # (B, N) fake-score prediction
                     inv_ptr,   # (B,) ACC 1 / norm_b, 0 for rejected samples
                     go_ptr,    # () incoming gradient of the loss
                     out_ptr,   # (B, N) d loss / d x, x's dtype
                     N, total, scale,
                     HAS_CFG: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # grid (cdiv(N, BLOCK), B): the sample index comes from the grid, not from a per-element integer division
    b = tl.program_id(1)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    offs = b.to(tl.int64) * N + idx
    inv = tl.load(inv_ptr + b)
    pr = tl.load(pr_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_CFG:
        pu = tl.load(pu_ptr + offs, mask=mask, other=0.0).to(ACC)
        pr = pu + scale * (pr - pu)
    pf = tl.load(pf_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = (pf - pr) * (inv * (tl.load(go_ptr).to(ACC) / total))
    # a rejected sample may hold NaN/inf predictions; where() keeps them out of its (zero) gradient
    tl.store(out_ptr + offs, tl.where(inv != 0, g, 0.0).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# launchers
def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _acc(dtype):
    return tl.float64 if _compute_dtype(dtype) == torch.float64 else tl.float32


def _split(B: int, N: int, device: torch.device, block: int) -> int:
    """Programs per sample: enough for ~4 waves of programs on the GPU's SMs, never more than N / BLOCK."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(N, block), triton.cdiv(4 * sms, B), 64))


def dmd_stats(x, pr, pf, pu=None, scale: float = 1.0, split: int | None = None, block: int | None = None):
    """Forward launches: returns (inv_norm (B,), loss ()) in the compute dtype. split/block: tests' overrides."""
    B, N = x.shape[0], x[0].numel()
    ct = _compute_dtype(x.dtype)
    block = block or (1024 if x.is_cuda else 1 << 14)
    split = split or _split(B, N, x.device, block)
    chunk = triton.cdiv(triton.cdiv(N, split), block) * block
    part = torch.empty((4, B, split), dtype=ct, device=x.device)
    cfg = pu is not None
    _dmd_stats_kernel[(B, split)](x, pr, pu if cfg else pr, pf, part, N, chunk, B, split, float(scale),
                                  HAS_CFG=cfg, ACC=_acc(x.dtype), BLOCK=block)
    inv = torch.empty((B,), dtype=ct, device=x.device)
    loss = torch.empty((1,), dtype=ct, device=x.device)
    block_b = min(triton.next_power_of_2(B), max(1, 4096 // triton.next_power_of_2(split)))
    _dmd_finalize_kernel[(1,)](part, inv, loss, B, split, N, x.numel(), ACC=_acc(x.dtype),
                               BLOCK_B=block_b, BLOCK_S=triton.next_power_of_2(split))
    return inv, loss[0]


def dmd_grad(pr, pf, inv, grad_output, out_dtype, pu=None, scale: float = 1.0):
    """Backward launch: d loss / d x for the given incoming gradient (a 0-dim tensor, read on the device)."""
    total, B = pr.numel(), pr.shape[0]
    out = torch.empty(pr.shape, dtype=out_dtype, device=pr.device)
    N = total // B
    block = min(1024 if pr.is_cuda else 1 << 16, triton.next_power_of_2(N))
    cfg = pu is not None
    go = grad_output.reshape(()).to(device=pr.device).contiguous()
    _dmd_grad_kernel[(triton.cdiv(N, block), B)](pr, pu if cfg else pr, pf, inv, go, out, N, total, float(scale),
                                                HAS_CFG=cfg, ACC=_acc(out_dtype), BLOCK=block)
    return out


# ---------------------------------------------------------------------------------------------------------------
# autograd
class _DMDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pr, pf, pu, scale):
        inv, loss = dmd_stats(x, pr, pf, pu, scale)
        ctx.save_for_backward(pr, pf, inv, *([] if pu is None else [pu]))
        ctx.scale, ctx.x_dtype = scale, x.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        pr, pf, inv, *pu = ctx.saved_tensors
        gx = dmd_grad(pr, pf, inv, grad_output, ctx.x_dtype, pu[0] if pu else None, ctx.scale)
        return gx, None, None, None, None


def dmd_loss(x: torch.Tensor, pred_real: torch.Tensor, pred_fake: torch.Tensor,
             pred_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Drop-in for engine.losses.distribution_matching_loss(x, pred_real, pred_fake).

    With pred_uncond given, pred_real is the conditional teacher prediction and the real score is
    pred_uncond + guidance_scale * (pred_real - pred_uncond). Gradients flow to x only (the predictions are
    constants, as in the reference). Runs where kernels.runs_triton allows (CUDA, or CPU under the interpreter);
    choosing between this and the eager reference is the caller's decision (engine/hotpath.py).
    """
    preds = [pred_real, pred_fake] + ([] if pred_uncond is None else [pred_uncond])
    for p in preds:
        if p.shape != x.shape:
            raise ValueError(f"dmd_loss: prediction shape {tuple(p.shape)} != x shape {tuple(x.shape)}")
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(f"dmd_loss: x must be (B, ...) with B and the rest non-empty, got {tuple(x.shape)}")
    if x.shape[0] > 65535:  # CUDA's limit on the grid axis that carries the sample index
        raise ValueError(f"dmd_loss: batch {x.shape[0]} > 65535; split the batch")
    if not runs_triton(_dmd_stats_kernel, x, *preds):
        raise RuntimeError("dmd_loss: the Triton kernels run on CUDA tensors, or on CPU tensors only with "
                           "TRITON_INTERPRET=1 set before kernels.dmd is imported")
    pr, pf = (p.detach().contiguous() for p in (pred_real, pred_fake))
    pu = None if pred_uncond is None else pred_uncond.detach().contiguous()
    return _DMDLoss.apply(x.contiguous(), pr, pf, pu, float(guidance_scale))
