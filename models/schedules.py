"""Noise schedules, tabulated on T discrete timesteps (t = 0 is the least noisy).

Every family is written in the paper's form x_t = alpha_t * x0 + sigma_t * eps (DMD Sec. 3), so the engine
never needs to know which family a teacher uses:
  * "vp":  DDPM discrete schedule, betas as diffusers' DDPMScheduler defines them, alpha_t = sqrt(alphabar_t).
  * "edm": Karras et al. 2022 sigmas (alpha_t = 1) on a T-point grid, as DMD's EDM teachers use them.
"""
from __future__ import annotations

import math

import torch


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(-1, *([1] * (ndim - 1)))


class NoiseSchedule:
    def __init__(self, kind: str, alpha: torch.Tensor, sigma: torch.Tensor, net_time: torch.Tensor,
                 sigma_data: float = 0.5):
        self.kind, self.sigma_data = kind, float(sigma_data)
        self.alpha, self.sigma, self.net_time = alpha.float(), sigma.float(), net_time.float()
        self.T = len(alpha)
        self.sigma_last = float(self.sigma[-1])  # a Python float: no device sync, no graph break under compile
        self._tables: dict = {}  # device -> (alpha, sigma, net_time) there, so lookups never copy t to the host
        self.params: dict = {}  # constructor arguments, so the schedule can be written back as a scheduler config

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def vp(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
           beta_schedule: str = "linear") -> "NoiseSchedule":
        T = num_train_timesteps
        if beta_schedule == "linear":  # Ho et al. 2020
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":  # Stable Diffusion
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, Eq. 17
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta_schedule '{beta_schedule}' (linear, scaled_linear, squaredcos_cap_v2)")
        alphabar = torch.cumprod(1.0 - betas, 0)
        sch = cls("vp", alphabar.sqrt(), (1 - alphabar).sqrt(), torch.arange(T, dtype=torch.float64))
        sch.params = dict(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule)
        return sch

    @classmethod
    def edm(cls, num_train_timesteps: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0,
            rho: float = 7.0, sigma_data: float = 0.5) -> "NoiseSchedule":
        ramp = torch.linspace(0, 1, num_train_timesteps, dtype=torch.float64)
        # Karras et al. 2022 Eq. 5, ascending so that t = T-1 is the noisiest.
        sigma = (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
        # c_noise = ln(sigma) / 4 (EDM Table 1; diffusers' EDMEulerScheduler.precondition_noise).
        sch = cls("edm", torch.ones_like(sigma), sigma, 0.25 * sigma.log(), sigma_data)
        sch.params = dict(num_train_timesteps=num_train_timesteps, sigma_min=sigma_min, sigma_max=sigma_max,
                          rho=rho, sigma_data=sigma_data)
        return sch

    # --- lookups --------------------------------------------------------------------------------
    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one entry
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._tables:
            self._tables[device] = tuple(v.to(device) for v in (self.alpha, self.sigma, self.net_time))
        return self._tables[device]

    def coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t for per-sample timesteps t (B,), broadcast against `like` (B, ...)."""
        alpha, sigma, _ = self.tables(like.device)
        idx = t.to(device=like.device, dtype=torch.long)
        a, s = alpha[idx].to(like.dtype), sigma[idx].to(like.dtype)
        return _bcast(a, like.ndim), _bcast(s, like.ndim)

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        return self.tables(t.device)[2][t.long()]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coeffs(t, x0)
        return a * x0 + s * eps

    def sample_t(self, n: int, lo_frac: float = 0.02, hi_frac: float = 0.98, generator=None,
                 device="cpu") -> torch.Tensor:
        """t ~ U{lo_frac*T, ..., hi_frac*T} (DMD Sec. 3.2: T_min = 0.02 T, T_max = 0.98 T)."""
        lo, hi = int(lo_frac * self.T), min(int(hi_frac * self.T), self.T - 1)
        return torch.randint(lo, hi + 1, (n,), generator=generator, device="cpu").to(device)

    def nearest_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Grid index whose sigma/alpha ratio is nearest (used to snap EDM's log-normal training sigmas)."""
        ratio = (self.sigma / self.alpha).log()
        return (ratio[None, :] - sigma.detach().cpu().float().log()[:, None]).abs().argmin(1)

    # --- parameterisations (epsilon / v / x0), exact inverses of each other -----------------------
    def x0_from_eps(self, x_t, eps, t):
        a, s = self.coeffs(t, x_t)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t, x0, t):
        a, s = self.coeffs(t, x_t)
        return (x_t - a * x0) / s

    def x0_from_v(self, x_t, v, t):  # v = alpha * eps - sigma * x0 (Salimans & Ho 2022), alpha^2 + sigma^2 = 1
        a, s = self.coeffs(t, x_t)
        return (a * x_t - s * v) / (a * a + s * s)

    def v_from_x0(self, x_t, x0, t):
        a, s = self.coeffs(t, x_t)
        return a * self.eps_from_x0(x_t, x0, t) - s * x0

    def loss_weight(self, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Per-sample weight that turns ||x0_hat - x0||^2 into the family's native training loss."""
        alpha, sigma, _ = self.tables(t.device)
        a, s = alpha[t.long()], sigma[t.long()]
        if self.kind == "edm":  # lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma * sigma_d)^2, EDM Eq. 8 / Table 1
            sd = self.sigma_data
            w = (s ** 2 + sd ** 2) / (s * sd) ** 2
        elif prediction_type == "epsilon":  # ||eps_hat - eps||^2 = (alpha/sigma)^2 ||x0_hat - x0||^2
            w = (a / s) ** 2
        elif prediction_type == "v_prediction":  # ||v_hat - v||^2 = ||x0_hat - x0||^2 / sigma^2
            w = 1 / s ** 2
        else:
            w = torch.ones_like(a)
        return w
