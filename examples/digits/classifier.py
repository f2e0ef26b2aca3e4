"""The digits feature extractor for evaluation: a small CNN classifier trained on the training split.

Its 64-d penultimate activations play the role Inception features play in FID; its argmax gives the class
accuracy of class-conditional samples. Plugged into clean-fid as a custom feature extractor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    def __init__(self, resolution: int = 8):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(128 * (resolution // 4) ** 2, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        return x

    def features(self, x):
        return self.body(self.prep(x))

    def forward(self, x):
        return self.head(self.features(x))


def save_classifier(model: DigitsClassifier, folder, meta: dict):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"resolution": model.resolution, **meta}, indent=2))


def load_classifier(folder) -> DigitsClassifier:
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"digits classifier not found in '{folder}' (make it with examples/digits/train_classifier.py)")
    cfg = json.loads((folder / "config.json").read_text())
    m = DigitsClassifier(cfg["resolution"])
    m.load_state_dict(load_file(folder / "model.safetensors"))
    return m.eval().requires_grad_(False)


class CleanFIDExtractor(nn.Module):
    """clean-fid hands custom extractors (B, 3, H, W) float batches in [0, 255]; we return the features of a
    digits network with a `features` method (this classifier, or the second judge in judge.py)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net.features(batch[:, :1].float() / 127.5 - 1.0)
