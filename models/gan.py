"""DMD2's discriminator: a small classification head on the fake score's bottleneck (DMD2 Sec. 4.3).

The fake score already learns the generator's distribution at every noise level, so its mid-block features
are a cheap, well-conditioned input for a real-vs-generated classifier (Diffusion-GAN: both are noised first).
The head lives on the fake score as the submodule `gan_head`, so it is trained by the fake score's optimiser,
partitioned with it under ZeRO-3 and saved in its checkpoints, and never exported with the generator.

The features come from a forward hook on the diffusers UNet's `mid_block` (UNet2DModel and
UNet2DConditionModel alike): the network's own forward runs unchanged. With `early_exit` the hook ends that
forward at the mid block by raising, so D's passes skip the up path's forward (its backward never runs: D
does not read it), as DMD2's classifier forward does; the owner of the network decides whether a cut-short
forward is safe (engine/backend.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bottleneck_channels(net: nn.Module) -> int:
    """Channels of a diffusers UNet's mid-block output, or ValueError when it has no mid block."""
    if getattr(net, "mid_block", None) is None:
        raise ValueError(f"{type(net).__name__} has no mid_block: the GAN head needs a diffusers UNet with one")
    return int(net.config.block_out_channels[-1])


class GANHead(nn.Module):
    """Bottleneck features (B, C, h, w) -> one real-vs-generated logit per sample.

    Two 3x3 convolutions then a global mean: any bottleneck size works, including the 1x1 or 2x2 of small
    pixel models (DMD2's strided 4x4 stack assumes SD's 8x8)."""

    def __init__(self, channels: int, width: int = 0):
        super().__init__()
        width = width or min(channels, 256)
        groups = 32 if width % 32 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU())
        self.out = nn.Linear(width, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(feats).mean(dim=(2, 3))).squeeze(1).float()


class _Taken(Exception):
    """Raised by the hook to end the UNet's forward once the features are in hand."""


def attach_head(denoiser: nn.Module, width: int = 0, early_exit: bool = False) -> GANHead:
    """Gives a fake-score Denoiser its `gan_head` (built on the denoiser's device and in float32) and one
    persistent forward hook on its mid block, which keeps the features only while `discriminate` asks: other
    passes (the denoising loss, mu_fake) keep nothing, and no hook is added or removed per call (which would
    make torch.compile and DeepSpeed's prefetch trace start over). `early_exit`: discriminate's passes stop at
    the mid block (eager networks only: a compiled one would take the exception for a failure)."""
    head = GANHead(bottleneck_channels(denoiser.net), width)
    ref = next(denoiser.net.parameters(), None)
    denoiser.gan_head = head.to(ref.device) if ref is not None else head
    head.taken = None  # a list while discriminate runs
    head.early_exit, head.stop = early_exit, False

    def tap(module, args, out):
        if head.taken is not None:
            head.taken.append(out)
            if head.stop:
                raise _Taken
    denoiser.net.mid_block.register_forward_hook(tap)
    return denoiser.gan_head


def discriminate(denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """D(x_t): logits (B,) of the fake score's head on its bottleneck features at noise level t."""
    head = denoiser.gan_head
    head.taken = []
    head.stop = head.early_exit and getattr(denoiser, "net_call", None) is None
    try:
        try:
            denoiser(x_t, t, cond)
        except _Taken:
            pass
        if not head.taken:
            raise RuntimeError("the fake score's mid block did not run")
        feats = head.taken[-1]
    finally:
        head.taken, head.stop = None, False
    return head(feats)


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(G(z))), per sample."""
    return F.softplus(-logits_fake)


def discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """softplus(D(G(z))) + softplus(-D(x_real)), per sample (generated and real batches of equal size)."""
    return F.softplus(logits_fake) + F.softplus(-logits_real)
