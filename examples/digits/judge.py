"""The second digits judge: a convolutional denoising autoencoder whose 32-d bottleneck is a feature space for
Frechet distance, independent of the classifier's (examples/digits/classifier.py).

Independent in what matters for an evaluator: another architecture (strided convolutions and SiLU, no pooling,
no class head), another objective (reconstruct the clean digit from a noised one; labels are never seen) and
another seed. Settings tuned until the classifier's FD looks good have not been tuned on this one, so a gain
that shows in both is less likely to be an artefact of one network's blind spots. Trained by
examples/digits/train_judge.py on the training split, shipped in assets/digits_judge/.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

FEATURE_DIM = 32
SPACE = "denoising-autoencoder bottleneck"  # how reports name this feature space


class DigitsJudge(nn.Module):
    def __init__(self, resolution: int = 8, width: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"the judge's resolution must be a multiple of 4, got {resolution}")
        self.resolution, self.width, self.feature_dim = resolution, width, feature_dim
        s, w = resolution // 4, width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * w * s * s, feature_dim))
        self.decoder = nn.Sequential(
            nn.Linear(feature_dim, 2 * w * s * s), nn.SiLU(), nn.Unflatten(1, (2 * w, s, s)),
            nn.ConvTranspose2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 1, 3, padding=1))

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        # samples at another side are brought to the judge's, as the classifier does
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [-1, 1] -> (N, feature_dim)."""
        return self.encoder(self.prep(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(x))


def config_of(model: DigitsJudge) -> dict:
    return {"resolution": model.resolution, "width": model.width, "feature_dim": model.feature_dim}


def save_judge(model: DigitsJudge, folder, meta: dict):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**config_of(model), **meta}, indent=2) + "\n")


def load_judge(folder) -> DigitsJudge:
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"digits judge not found in '{folder}' (make it with examples/digits/train_judge.py)")
    cfg = json.loads((folder / "config.json").read_text())
    m = DigitsJudge(cfg["resolution"], cfg["width"], cfg["feature_dim"])
    m.load_state_dict(load_file(folder / "model.safetensors"))
    return m.eval().requires_grad_(False)
