"""DMD's losses as small callables (EDM style: they return unreduced per-sample values unless noted).

distribution_matching_loss  DMD Eq. 7-8: gradient on x is (mu_fake - mu_real) / mean_chw|x - mu_real|.
denoising_loss              the fake score's ordinary diffusion loss on detached generator samples.
RegressionLoss              LPIPS (images) or MSE (toy) between G(z_ref) and the teacher's ODE output y_ref.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def dm_gradient(x: torch.Tensor, pred_real: torch.Tensor, pred_fake: torch.Tensor) -> torch.Tensor:
    """(pred_fake - pred_real) / mean_{c,h,w}|x - pred_real| per sample (DMD Eq. 8, with w_t folded in).

    A sample whose normaliser is zero or non-finite, or whose predictions are non-finite, gets a zero
    gradient, so one bad sample cannot poison the batch.
    """
    ct = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 math in fp32, fp64 stays fp64
    x, pr, pf = (a.detach().to(ct) for a in (x, pred_real, pred_fake))
    dims = tuple(range(1, x.ndim))
    norm = (x - pr).abs().mean(dim=dims, keepdim=True)
    grad = (pf - pr) / norm
    ok = torch.isfinite(grad).all(dim=dims, keepdim=True) & torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, grad, torch.zeros_like(grad))


def distribution_matching_loss(x: torch.Tensor, pred_real: torch.Tensor, pred_fake: torch.Tensor) -> torch.Tensor:
    """Scalar 0.5 * mse(x, stopgrad(x - grad)); its gradient w.r.t. x is exactly grad / x.numel()."""
    grad = dm_gradient(x, pred_real, pred_fake)
    # x - (x - grad) cancels badly in bf16 when grad << x; in fp32 the gradient stays exact.
    xf = x.to(grad.dtype)
    return 0.5 * F.mse_loss(xf, (xf - grad).detach(), reduction="mean")


def denoising_loss(denoiser, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond=None,
                   weighting: str = "native") -> torch.Tensor:
    """Per-sample w(t) * mean_chw ||mu(x_t, t) - x0||^2; 'native' w(t) makes it the teacher's own loss."""
    x0 = x0.detach()
    x0_hat = denoiser(denoiser.schedule.add_noise(x0, eps, t), t, cond)
    per = (x0_hat - x0).float().square().mean(dim=tuple(range(1, x0.ndim)))
    if weighting == "x0":
        return per
    return denoiser.schedule.loss_weight(t, denoiser.prediction_type).to(per) * per


LPIPS_BACKBONE_FILES = {  # torchvision checkpoints the lpips package's backbones load from the torch cache
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def lpips_backbone_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


def check_regression_loss(tc):
    """Refuses, before any work, a regression loss that cannot be built here (a pretrained LPIPS backbone
    missing from the torch cache), so a run does not make its pairs first and fail after."""
    if tc.reg_weight > 0 and tc.regression_loss == "lpips" and tc.lpips_backbone == "pretrained" \
            and not lpips_backbone_path(tc.lpips_net).is_file():
        raise FileNotFoundError(
            f"LPIPS needs the pretrained {tc.lpips_net} backbone at {lpips_backbone_path(tc.lpips_net)} and it is not "
            f"there (no download is possible); copy it into the torch cache, or set "
            f"\"train\": {{\"lpips_backbone\": \"random\"}} for a test run")


class LPIPSRegression(nn.Module):
    """LPIPS(x, y) per sample, for images in [-1, 1] with 1 or 3 channels (resized to `size` first).

    backbone="pretrained" needs the torchvision weights in the torch cache (no download is attempted);
    backbone="random" uses a seeded random backbone with the package's learned linear heads.
    """

    def __init__(self, net: str = "alex", backbone: str = "pretrained", size: int = 64):
        super().__init__()
        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"lpips_net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got '{net}'")
        if backbone not in ("pretrained", "random"):
            raise ValueError(f"lpips_backbone must be 'pretrained' or 'random', got '{backbone}'")
        check_regression_loss(SimpleNamespace(reg_weight=1, regression_loss="lpips", lpips_backbone=backbone,
                                              lpips_net=net))
        import warnings

        import lpips
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation, from lpips
            torch.manual_seed(0)
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=(backbone == "random"), verbose=False)
        self.lpips.eval().requires_grad_(False)
        self.size, self.backbone = size, backbone

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def prep(a):
            a = a.float()
            if a.shape[1] == 1:
                a = a.expand(-1, 3, -1, -1)
            if a.shape[-1] != self.size:
                a = F.interpolate(a, size=(self.size, self.size), mode="bilinear", align_corners=False)
            return a
        return self.lpips(prep(x), prep(y), normalize=False).flatten()


class MSERegression(nn.Module):
    backbone = "n/a"

    def forward(self, x, y):
        return (x.float() - y.float()).square().flatten(1).mean(1)


def make_regression_loss(tc) -> nn.Module:
    if tc.regression_loss == "lpips":
        return LPIPSRegression(tc.lpips_net, tc.lpips_backbone, tc.lpips_size)
    if tc.regression_loss == "mse":
        return MSERegression()
    raise ValueError(f"train.regression_loss must be 'lpips' or 'mse', got '{tc.regression_loss}'")
