"""The DM loss and the noise injection of the generator step, eager PyTorch or Triton, chosen once by name
(train.kernels). Both paths compute the same values and gradients; engine.losses is the reference that the
kernel tests compare against (tests/test_kernels.py).

    auto    Triton on CUDA, eager elsewhere
    eager   engine.losses.distribution_matching_loss and NoiseSchedule.add_noise
    triton  kernels.dmd.dmd_loss and kernels.noise.add_noise (on CPU only under TRITON_INTERPRET=1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import DMDError
from .losses import distribution_matching_loss

CHOICES = ("auto", "eager", "triton")


@dataclass(frozen=True)
class HotPath:
    name: str
    dm_loss: Callable    # (x, pred_real, pred_fake) -> scalar loss whose gradient on x is the DM gradient / numel
    add_noise: Callable  # (x, t, schedule, eps) -> x_t = alpha_t x + sigma_t eps


def _eager_noise(x, t, schedule, eps):
    return schedule.add_noise(x, eps, t)


EAGER = HotPath("eager", distribution_matching_loss, _eager_noise)


def select(choice: str, device: torch.device) -> HotPath:
    if choice not in CHOICES:
        raise DMDError(f"train.kernels must be auto, eager or triton, got '{choice}'")
    if choice == "eager" or (choice == "auto" and device.type != "cuda"):
        return EAGER
    try:
        from kernels import dmd, noise, runs_triton
    except ImportError as e:
        if choice == "auto":
            return EAGER
        raise DMDError(f"train.kernels='triton' needs the triton package ({e})") from None
    if not runs_triton(dmd._dmd_stats_kernel, torch.empty(0, device=device)):
        raise DMDError("train.kernels='triton' needs a CUDA device, or TRITON_INTERPRET=1 in the environment "
                       "for Triton's (slow) CPU interpreter")

    def triton_noise(x, t, schedule, eps):
        # eps still comes from the trainer's CPU stream, so a run is the same draw for draw as an eager one
        return noise.add_noise(x, t, *schedule.tables(x.device)[:2], eps=eps)

    return HotPath("triton", dmd.dmd_loss, triton_noise)
