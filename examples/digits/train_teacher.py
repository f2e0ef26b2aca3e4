"""Train the embedded digits teacher: a small class-conditional UNet2DModel with EDM preconditioning.

    python examples/digits/train_teacher.py --config configs/digits_teacher.json --out assets/digits_teacher

Writes a diffusers folder (unet/, scheduler/, dmd_model.json) with the EMA weights, replaced atomically at
each eval point so an interrupted run never leaves a half-written teacher, plus train_log.jsonl and a grid.
"""
if __name__ == "__main__":  # run as a script from a checkout: the repo root on sys.path
    import _bootstrap  # noqa: F401

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine import cli
from engine.config import DataSection, EvalSection, load, to_dict
from engine.files import swap_in
from engine.sampling import save_grid, to_uint8
from examples.digits.data import NUM_CLASSES, load_digits
from models.denoiser import Denoiser, schedule_from_scheduler_config
from models.samplers import sample


@dataclass
class TeacherTrainSection:
    steps: int = 8000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1        # share of labels replaced by the null class (enables guidance)
    p_mean: float = -1.2              # EDM log-normal sigma sampling (Karras et al. 2022, Table 1)
    p_std: float = 1.2
    hflip: bool = False
    seed: int = 0
    eval_every: int = 2000
    eval_samples: int = 360
    threads: int = 0


@dataclass
class TeacherConfig:
    name: str = "teacher"
    data: DataSection = field(default_factory=DataSection)
    unet: dict = field(default_factory=dict)       # UNet2DModel keyword arguments
    scheduler: dict = field(default_factory=dict)  # diffusers scheduler config (_class_name + its keys)
    train: TeacherTrainSection = field(default_factory=TeacherTrainSection)
    eval: EvalSection = field(default_factory=EvalSection)


def build_teacher(cfg: TeacherConfig) -> Denoiser:
    from diffusers import UNet2DModel
    unet_kw = dict(cfg.unet)
    unet_kw.setdefault("num_class_embeds", NUM_CLASSES + 1)  # + the null class for guidance
    net = UNet2DModel(**unet_kw)
    sch = schedule_from_scheduler_config(cfg.scheduler)
    shape = [net.config.in_channels, net.config.sample_size, net.config.sample_size]
    return Denoiser(net, sch, cfg.scheduler.get("prediction_type", "epsilon"), NUM_CLASSES, NUM_CLASSES, shape)


def save_folder_atomic(model: Denoiser, out: Path, meta: dict):
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, meta)
    swap_in(tmp, out)


def main():
    args = cli.parser(__doc__).parse_args()
    cfg = load(args.config, TeacherConfig, args.set)
    tc = cfg.train
    cli.set_threads(tc.threads)
    torch.manual_seed(tc.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x_all, y_all = load_digits("train", cfg.data.resolution)
    model = build_teacher(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    sch = model.schedule
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    log_path = out.with_name(out.name + "_train_log.jsonl")
    log = open(log_path, "a")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params / 1e6:.2f} M parameters, {len(x_all)} training digits, schedule {sch.kind}")
    gen = torch.Generator().manual_seed(tc.seed)
    pbar = tqdm(range(1, tc.steps + 1), desc="teacher", dynamic_ncols=True)
    t0, run_loss = time.time(), 0.0
    for step in pbar:
        idx = torch.randint(0, len(x_all), (tc.batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y), generator=gen) < tc.label_dropout] = NUM_CLASSES
        if sch.kind == "edm":  # log-normal sigmas (EDM Table 1), snapped to the T-point grid
            sig = (tc.p_mean + tc.p_std * torch.randn(len(y), generator=gen)).exp()
            t = sch.nearest_t(sig)
        else:
            t = torch.randint(0, sch.T, (len(y),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x0_hat = model(sch.add_noise(x0, eps, t), t, y)
        w = sch.loss_weight(t, model.prediction_type)
        loss = (w * (x0_hat - x0).square().mean((1, 2, 3))).mean()
        for g in opt.param_groups:  # linear warm-up, then cosine to 10 %
            frac = step / max(tc.warmup_steps, 1) if step <= tc.warmup_steps else \
                0.55 + 0.45 * math.cos(math.pi * (step - tc.warmup_steps) / max(tc.steps - tc.warmup_steps, 1))
            g["lr"] = tc.lr * min(frac, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - tc.ema_decay)
        run_loss += loss.item()
        if step % 50 == 0:
            pbar.set_postfix(loss=f"{run_loss / 50:.4f}")
            log.write(json.dumps({"step": step, "loss": run_loss / 50, "time_s": time.time() - t0}) + "\n")
            log.flush()
            run_loss = 0.0
        if step % tc.eval_every == 0 or step == tc.steps:
            meta = {"trained_steps": step, "train_config": to_dict(cfg), "train_time_s": round(time.time() - t0, 1)}
            save_folder_atomic(ema, out, meta)
            z = torch.randn((100, *ema.sample_shape), generator=torch.Generator().manual_seed(0))
            imgs = sample(ema, z, torch.arange(100) % NUM_CLASSES, cfg.eval.teacher_sampler, cfg.eval.teacher_steps)
            save_grid(to_uint8(imgs), out.with_name(out.name + "_grid.png"))
    print(f"saved {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    cli.main_guard(main)
