"""The trainers bench/throughput.py times one training step of: the digits teacher's DMD step, and SD1.5's UNet at
random weights behind one fixed random text embedding (no weights or text encoder needed)."""
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def digits_trainer(dev: torch.device, kernels: str, compile_: str | None):
    """configs/digits.json without the regression term (it needs pairs and its LPIPS cost does not change with
    kernels). compile_: None, "generator" or "all" (train.compile_scope)."""
    from engine.config import DMDConfig, load
    from engine.plain import PlainBackend
    from engine.trainer import DMDTrainer
    cfg = load(ROOT / "configs/digits.json", DMDConfig,
               ["train.reg_weight=0", f"train.kernels=\"{kernels}\"", f"train.compile={json.dumps(bool(compile_))}",
                f"train.compile_scope=\"{compile_ or 'generator'}\""])
    torch.manual_seed(0)
    return DMDTrainer(PlainBackend(cfg, dev), cfg.train, seed=0), cfg.train.batch_size


class _FixedPrompt(torch.nn.Module):
    """SD1.5's UNet with one fixed random text embedding, so the engine's class-free path drives it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.register_buffer("emb", torch.randn(1, 77, unet.config.cross_attention_dim))

    def forward(self, x, t, **_):
        return self.unet(x, t, encoder_hidden_states=self.emb.expand(x.shape[0], -1, -1).to(x.dtype)).sample


def _sd_models(tc, dev: torch.device):
    """engine.plain.PlainBackend around a random-weight SD1.5 UNet teacher (generator and fake score: fp32 copies)."""
    from engine.config import DMDConfig
    from engine.plain import PlainBackend
    from models import Denoiser
    from models.sd15 import sd15_schedule, sd15_unet
    torch.manual_seed(0)
    net, attn = sd15_unet()
    teacher = Denoiser(_FixedPrompt(net), sd15_schedule(), "epsilon", None, None, (4, 64, 64))
    m = PlainBackend(DMDConfig(train=tc), dev, teacher=(teacher, "random weights"))
    m.teacher.to(torch.bfloat16)  # after the copies were made: the frozen teacher alone is kept in bf16
    m.attn = attn
    return m


def sd15_trainer(dev: torch.device, batch: int, kernels: str, compile_: str | None):
    from engine.config import TrainSection
    from engine.trainer import DMDTrainer
    tc = TrainSection(batch_size=batch, reg_weight=0.0, kernels=kernels, compile=bool(compile_),
                      compile_scope=compile_ or "generator", lr_generator=1e-6, lr_fake=1e-6)
    return DMDTrainer(_sd_models(tc, dev), tc, seed=0), tc.batch_size
