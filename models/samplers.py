"""Deterministic teacher samplers (probability-flow ODE), written for any NoiseSchedule.

Both work in the variance-exploding view y = x / alpha_t, s_t = sigma_t / alpha_t, where the ODE reads
dy/ds = (y - mu(x_t, t)) / s (Karras et al. 2022, Eq. 4 with Table 1's VP/VE choices folded in).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


def sampling_timesteps(T: int, steps: int) -> list[int]:
    """`steps` grid points from T-1 down to 0, evenly spaced in index (for EDM grids: Karras spacing)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if steps == 1:
        return [T - 1]
    return torch.linspace(T - 1, 0, steps).round().long().tolist()


def nfe(sampler: str, steps: int) -> int:
    return steps if sampler == "ddim" else max(2 * steps - 1, 1)


@torch.no_grad()
def sample(denoiser, z: torch.Tensor, cond=None, sampler: str = "heun", steps: int = 18, guidance: float = 1.0,
           progress: bool = False) -> torch.Tensor:
    """Run the teacher's ODE from unit noise z; returns x0 (same shape as z).

    ddim: K steps, K network evaluations (Song et al. 2021, Eq. 12 with eta = 0).
    heun: EDM Algorithm 1 (2nd order, no churn), 2K - 1 evaluations; the last step to s = 0 is Euler.
    """
    if sampler not in ("ddim", "heun"):
        raise ValueError(f"unknown sampler '{sampler}' (ddim, heun)")
    sch = denoiser.schedule
    ts = sampling_timesteps(sch.T, steps)
    alpha, sigma = sch.alpha, sch.sigma
    x = denoiser.init_noise(z)
    mu = lambda x, t: denoiser.guided(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), cond, guidance)
    for i in tqdm(range(len(ts)), disable=not progress, desc=f"{sampler} x{steps}", leave=False):
        t = ts[i]
        x0 = mu(x, t)
        if i == len(ts) - 1:
            return x0
        tn = ts[i + 1]
        if sampler == "ddim":
            eps = (x - alpha[t] * x0) / sigma[t]
            x = alpha[tn] * x0 + sigma[tn] * eps
            continue
        y, s, sn = x / alpha[t], sigma[t] / alpha[t], sigma[tn] / alpha[tn]
        d = (y - x0) / s
        y_next = y + (sn - s) * d
        d_next = (y_next - mu(alpha[tn] * y_next, tn)) / sn
        x = alpha[tn] * (y + (sn - s) * 0.5 * (d + d_next))
    return x
