"""DMD2 training iteration with the discriminator's passes cut short at the fake score's mid block vs run whole.

    python bench/gan_step.py                                   # configs/digits_dmd2.json on the default device
    python bench/gan_step.py --iters 12 --json runs/gan_step.json [--set train.threads=1]

One iteration = train.fake_updates_per_generator fake-score updates (denoising + discriminator loss) and one
generator update (DM + GAN loss). Two trainers are built alike from the same seed, one cutting D's passes at the
mid block (the one-process backend's default) and one running the whole UNet, and they step in alternation, so
both see the same machine state; the ratio of median iteration times is the figure. Their logs must agree
exactly at every iteration (the cut skips only work whose result D never reads): the script fails otherwise.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_flush_denormal(True)  # as engine/train.py: subnormal floats make CPU GAN steps many times slower

from engine import cli  # noqa: E402
from engine.config import DMDConfig, load  # noqa: E402
from engine.plain import PlainBackend, resolve_device  # noqa: E402
from engine.real_data import make_real_feed, open_real  # noqa: E402
from engine.trainer import DMDTrainer  # noqa: E402


def args_():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/digits_dmd2.json"), help="a DMD2 config (GAN on)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--iters", type=int, default=8, help="timed iterations per setting (after one warm-up)")
    p.add_argument("--json", default="", help="write the figures here too")
    return p.parse_args()


def build(cfg, early_exit: bool):
    torch.manual_seed(cfg.train.seed)
    models = PlainBackend(cfg, resolve_device(cfg.train.device))
    models.fake.gan_head.early_exit = early_exit
    reader, sampler = open_real(cfg, models)
    trainer = DMDTrainer(models, cfg.train, None, None, cfg.train.seed)
    trainer.real = make_real_feed(cfg.data.loader, reader, sampler, models)
    return trainer


def timed_step(trainer) -> tuple[float, dict]:
    sync = torch.cuda.synchronize if trainer.m.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    logs = trainer.train_step()
    sync()
    return time.perf_counter() - t0, logs


def main():
    a = args_()
    cfg = load(a.config, DMDConfig, a.set)
    tc = cfg.train
    if not (tc.gan_weight_generator > 0 and tc.gan_weight_fake > 0):
        raise SystemExit(f"{a.config}: train.gan_weight_generator and gan_weight_fake must both be > 0 to time "
                         f"every discriminator pass")
    if tc.compile and tc.compile_scope == "all":
        raise SystemExit("train.compile_scope all: a compiled fake score runs whole forwards, there is no cut to time")
    if tc.dropout != "none":
        raise SystemExit(f"train.dropout {tc.dropout}: a whole pass draws the up path's dropout masks too, so the two "
                         f"runs would not be the same run; time with train.dropout none")
    if a.iters < 1:
        raise SystemExit(f"--iters must be >= 1, got {a.iters}")
    cli.set_threads(tc.threads)
    runs = {"cut at the mid block": build(cfg, True), "whole UNet": build(cfg, False)}
    times = {k: [] for k in runs}
    for i in range(a.iters + 1):
        logs = {}
        for name, tr in (runs.items() if i % 2 else reversed(runs.items())):  # alternate which goes first
            dt, logs[name] = timed_step(tr)
            if i:  # the first iteration warms allocators and caches
                times[name].append(dt)
        first, second = logs["cut at the mid block"], logs["whole UNet"]
        if first != second:
            raise SystemExit(f"iteration {i}: the two settings' logs differ: {first} vs {second}")
    med = {k: statistics.median(v) for k, v in times.items()}
    dev = next(iter(runs.values())).m.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"{Path(a.config).name}: batch {tc.batch_size}, {tc.fake_updates_per_generator} fake updates per "
          f"generator update, {a.iters} iterations, {name}")
    for k, v in med.items():
        print(f"  {k:>22}: {v * 1e3:8.1f} ms per iteration (median; min {min(times[k]) * 1e3:.1f})")
    ratio = med["whole UNet"] / med["cut at the mid block"]
    print(f"  speed-up of the cut: {ratio:.2f}x (logs identical at every iteration)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"config": a.config, "overrides": a.set, "device": name,
                                            "iters": a.iters, "median_s": med, "speedup": ratio}, indent=2))
    for tr in runs.values():
        tr.real.close()


if __name__ == "__main__":
    main()
