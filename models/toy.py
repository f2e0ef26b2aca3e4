"""The paper's Figure 3 toy: an analytic teacher for a 2-D Gaussian mixture, and small MLP models.

The teacher is exact: for x_t = x0 + sigma * eps with x0 ~ sum_k w_k N(m_k, s0^2 I),
    E[x0 | x_t] = sum_k r_k(x_t) (m_k + s0^2 / (s0^2 + sigma^2) (x_t - m_k)),
    r_k ∝ w_k N(x_t; m_k, (s0^2 + sigma^2) I).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .denoiser import Denoiser
from .schedules import NoiseSchedule

MODES = ((-3.0, 0.0), (3.0, 0.0))
MODE_STD = 0.5


def toy_schedule() -> NoiseSchedule:
    return NoiseSchedule.edm(1000, sigma_min=0.002, sigma_max=80.0)


class GaussianMixtureDenoiser(Denoiser):
    def __init__(self, means=MODES, std: float = MODE_STD, weights=None):
        super().__init__(nn.Identity(), toy_schedule(), "sample", sample_shape=(2,))
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32))
        w = torch.full((len(means),), 1.0 / len(means)) if weights is None else torch.tensor(weights)
        self.register_buffer("log_w", w.float().log())
        self.std = float(std)

    def forward(self, x_t, t, cond=None):
        _, s = self.schedule.coeffs(t, x_t)                       # (B, 1)
        var = self.std ** 2 + s ** 2
        d2 = (x_t[:, None, :] - self.means[None]).square().sum(-1)  # (B, K)
        r = torch.softmax(self.log_w[None] - d2 / (2 * var), dim=1)
        post = self.means[None] + (self.std ** 2 / var)[:, :, None] * (x_t[:, None, :] - self.means[None])
        return (r[:, :, None] * post).sum(1)

    def sample_data(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        return self.means[k] + self.std * torch.randn(n, 2, generator=generator)


class MLPNet(nn.Module):
    """F(x, c_noise): an MLP with a sinusoidal embedding of the network time input."""

    def __init__(self, dim: int = 2, hidden: int = 128, time_features: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, 4, time_features // 2)))
        self.mlp = nn.Sequential(nn.Linear(dim + time_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, time, **_):
        ang = time.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([x, ang.sin(), ang.cos()], 1))


def mlp_denoiser(hidden: int = 128) -> Denoiser:
    return Denoiser(MLPNet(2, hidden), toy_schedule(), "epsilon", sample_shape=(2,))


class ToyGenerator(nn.Module):
    """z (B, 2) -> x (B, 2); starts as a narrow blob at `init_mean` (the right-hand mode, as in Fig. 3)."""
    noise_shape = (2,)

    def __init__(self, hidden: int = 128, init_mean=MODES[1], init_scale: float = 0.3):
        super().__init__()
        self.hidden, self.init_mean = hidden, tuple(init_mean)
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        with torch.no_grad():
            self.mlp[-1].weight.mul_(init_scale)
            self.mlp[-1].bias.copy_(torch.tensor(init_mean))

    def forward(self, z, cond=None):
        return self.mlp(z)

    def save_pretrained(self, folder, state_dict: dict | None = None):
        """state_dict: the weights to write when this module does not hold them (as OneStepGenerator)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"_class_name": "ToyGenerator", "hidden": self.hidden,
                                                        "init_mean": list(self.init_mean)}))

    @classmethod
    def from_pretrained(cls, folder):
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        g = cls(cfg["hidden"], cfg["init_mean"])
        g.load_state_dict(load_file(folder / "model.safetensors"))
        return g


def mode_shares(samples: torch.Tensor, radius: float = 1.5) -> list[float]:
    """Share of samples within `radius` of each mode."""
    m = torch.tensor(MODES)
    d = (torch.as_tensor(samples)[:, None, :] - m[None]).norm(dim=-1)
    return [float((d[:, k] < radius).float().mean()) for k in range(len(MODES))]
