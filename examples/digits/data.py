"""The embedded data set: scikit-learn's handwritten digits (1797 real 8x8 images, 10 classes).

Pixels (0..16) are mapped to [-1, 1]. A fixed stratified split keeps 20 % held out: the held-out digits
measure the metric's floor (real vs real) and the classifier's accuracy, and are never trained on.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10


def load_digits(split: str = "train", resolution: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns images (N, 1, R, R) float32 in [-1, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split
    if resolution % 8:
        raise ValueError(f"digits resolution must be a multiple of 8, got {resolution}")
    d = _load()
    x, y = d.images.astype(np.float32), d.target.astype(np.int64)
    idx_tr, idx_ho = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
    idx = {"train": idx_tr, "heldout": idx_ho, "all": np.arange(len(y))}.get(split)
    if idx is None:
        raise ValueError(f"unknown digits split '{split}' (train, heldout, all)")
    img = torch.from_numpy(x[np.sort(idx)] / 8.0 - 1.0)[:, None]
    if resolution != 8:
        img = F.interpolate(img, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return img.contiguous(), torch.from_numpy(y[np.sort(idx)])
