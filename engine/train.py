"""Distribution Matching Distillation: teacher -> one-step generator.

    python engine/train.py --config configs/digits.json --out runs/digits [--max-steps N] [--resume]
    deepspeed [--num_gpus N | --hostfile H] engine/train.py --config configs/digits_zero3.json --out runs/z3

One trainer, two engines: plain PyTorch on one process, or DeepSpeed ZeRO-3 (deepspeed.enabled in the config)
on one or many processes. The run folder gets config.json, log.jsonl, tb/ (TensorBoard), pairs/ (made first if
missing), checkpoint/ (plain) or checkpoints/ (DeepSpeed, newest K kept), generator/ (a diffusers folder for
stock diffusers), samples.npz and grid.png at the end.
"""
import _bootstrap  # noqa: F401

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine import checkpoint, cli
from engine.builder import DMDModels, load_teacher, resolve_device
from engine.config import DMDConfig, load, to_dict
from engine.losses import make_regression_loss
from engine.plots import plot_log
from engine.pair_loader import check_loader, make_pair_feed
from engine.pairs import BatchSampler, PairReader, expected_manifest, write_pairs
from engine.sampling import draw, one_step, save_samples
from engine.text2image import DecodedRegression, load_text
from engine.trainer import DMDTrainer


def build_models(cfg):
    if cfg.deepspeed.enabled:
        from engine.zero import ZeroDMDModels
        return ZeroDMDModels(cfg)
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1:
        raise cli.DMDError(f"started as {n} processes but deepspeed.enabled is false in the config "
                           f"(set it, e.g. --set deepspeed.enabled=true, or run one process)")
    return DMDModels(cfg, resolve_device(cfg.train.device))


def open_pairs(cfg, models, out: Path, progress=True) -> PairReader:
    """The run's pairs: read them if present (checked against this teacher and config), else make them.
    With several processes rank 0 makes them with an unpartitioned teacher while the others wait; for
    teachers too big for one device, make them beforehand with engine/make_pairs.py."""
    folder = Path(cfg.data.pairs_dir) if cfg.data.pairs_dir else out / "pairs"
    expect = expected_manifest(models.teacher_hash, cfg.data, models.sample_shape, models.num_classes, models.text)
    if not (folder / "manifest.json").is_file() and models.is_main:
        print(f"making {cfg.data.num_pairs} regression pairs in {folder}")
        teacher, text = models.teacher, models.text
        if not isinstance(models, DMDModels):  # ZeRO-3: a whole teacher on this process only
            teacher = load_teacher(cfg)[0]
            text = load_text(cfg, teacher)
        write_pairs(folder, teacher, models.teacher_hash, cfg.data, progress, text)
    models.barrier()
    return PairReader(folder, expect)


class Board:
    """TensorBoard scalars and sample grids on rank 0 (nothing when tensorboard is not installed)."""

    def __init__(self, folder: Path, enabled: bool):
        self.w = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.w = SummaryWriter(str(folder))
            except ImportError:
                pass

    def scalars(self, step: int, values: dict):
        if self.w is not None:
            for k, v in values.items():
                group = "loss" if k.startswith("loss") else "grad_norm" if k.startswith("grad") else \
                    "lr" if k.startswith("lr") else "memory" if k.startswith("peak") else "train"
                self.w.add_scalar(f"{group}/{k}", v, step)
            self.w.flush()

    def image(self, tag: str, png: Path, step: int):
        if self.w is not None:
            import numpy as np
            from PIL import Image
            self.w.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def close(self):
        if self.w is not None:
            self.w.close()


def main():
    p = cli.parser(__doc__)
    p.add_argument("--max-steps", type=int, default=None, help="cap the number of generator updates")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args()
    cfg = load(args.config, DMDConfig, args.set)
    tc = cfg.train
    check_loader(cfg.data.loader)
    if tc.reg_weight > 0 and tc.reg_batch_size > cfg.data.num_pairs:  # before the pairs are made, not after
        raise cli.DMDError(f"train.reg_batch_size = {tc.reg_batch_size} is larger than data.num_pairs = "
                           f"{cfg.data.num_pairs}")
    max_steps = args.max_steps if args.max_steps is not None else tc.max_steps
    cli.set_threads(tc.threads)
    out = cli.ensure_dir(args.out)
    t_start = time.time()
    torch.manual_seed(tc.seed)
    models = build_models(cfg)
    main_rank = models.is_main
    if cfg.deepspeed.enabled:
        torch.manual_seed(tc.seed + models.rank)  # dropout masks: each process its own stream
    quiet = args.quiet or not main_rank
    if main_rank:
        cli.atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))
    if hasattr(models, "local_param_counts"):  # what each rank holds: OUT/partition.json (tests, bench)
        counts = [None] * models.world_size
        torch.distributed.all_gather_object(counts, models.local_param_counts())
        if main_rank:
            cli.atomic_write_text(out / "partition.json", json.dumps(counts, indent=2))
    reader = open_pairs(cfg, models, out, not quiet) if tc.reg_weight > 0 else None
    t_pairs = time.time() - t_start
    regression = make_regression_loss(tc).to(models.device) if reader is not None else None
    if regression is not None and models.text is not None:  # latent models: LPIPS on decoded images
        regression = DecodedRegression(regression, models.to_images)
    sampler = BatchSampler(len(reader), tc.reg_batch_size, tc.seed) if reader is not None else None
    trainer = DMDTrainer(models, tc, regression, reader, tc.seed)
    nan_at = os.environ.get("DMD_TEST_NAN_AT_STEP", "")  # test hook: "k" poisons step k's loss, "k-" every step from k
    if nan_at:
        trainer.nan_steps = range(int(nan_at.rstrip("-")), 1 << 62 if nan_at.endswith("-") else int(nan_at) + 1)
    if args.resume:
        checkpoint.load(out, models, trainer, sampler)
        if main_rank:
            print(f"resumed at step {trainer.step}")
    elif tc.fake_warmup_steps and tc.dm_weight > 0 and tc.fake_score == "learned":
        with tqdm(total=tc.fake_warmup_steps, desc="fake-score warm-up", disable=quiet) as bar, models.autocast():
            trainer.warmup_fake(tc.fake_warmup_steps, bar)
    feed = make_pair_feed(cfg.data.loader, reader, sampler, models) if reader is not None else None  # after resume
    log = open(out / "log.jsonl", "a") if main_rank else None
    board = Board(out / "tb", main_rank)
    bar = tqdm(total=max_steps, initial=trainer.step, desc=cfg.name, disable=quiet, dynamic_ncols=True)
    keep = cfg.deepspeed.keep_checkpoints

    def save():
        checkpoint.save(out, models, trainer, sampler, {"config": to_dict(cfg)}, keep)

    t_train = time.time()
    n_seen = 0
    acc: dict = {}  # running sums since the last log line, so the log shows means, not single noisy steps
    while trainer.step < max_steps:
        ref = None
        if feed is not None:
            z_ref, y_ref, c_ref = feed.next()  # this process's slice, on its device
            ref = (z_ref, y_ref, models.condition(c_ref) if models.num_classes else None)
        with models.autocast():
            logs = trainer.train_step(ref)
        n_seen += tc.batch_size
        if trainer.skips_in_row >= tc.max_consecutive_skips:
            raise cli.DMDError(f"step {trainer.step}: {trainer.skips_in_row} non-finite steps in a row (limit "
                               f"train.max_consecutive_skips = {tc.max_consecutive_skips}); stopped, last good "
                               f"checkpoint kept")
        checkpoint.kill_hook("DMD_TEST_KILL_AT_STEP", trainer.step)  # test hook: SIGKILL mid-run
        for k, v in logs.items():
            if math.isfinite(v):  # a skipped step's non-finite losses are counted, not averaged
                acc[k] = acc.get(k, 0.0) + v
                acc["_n_" + k] = acc.get("_n_" + k, 0) + 1
        if trainer.step % tc.log_every == 0 or trainer.step == max_steps:
            rate = n_seen / max(time.time() - t_train, 1e-9)
            means = {k: v / acc["_n_" + k] for k, v in acc.items() if not k.startswith("_n_")}
            acc = {}
            mem = models.peak_memory_mib()  # collective with several processes
            extra = {**models.lrs(), "skipped_total": trainer.skipped_total,
                     **{f"peak_mem_mib_rank{r}": m for r, m in enumerate(mem)}}
            if main_rank:
                log.write(json.dumps({"step": trainer.step, **means, "samples_per_s": rate, **extra,
                                      "time_s": time.time() - t_start}) + "\n")
                log.flush()
                board.scalars(trainer.step, {**means, **extra, "samples_per_s": rate})
                bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k.startswith("loss")} | {"img/s": f"{rate:.0f}"})
        if tc.sample_every and trainer.step % tc.sample_every == 0:
            # every process draws (ZeRO-3 gathers parameters collectively)
            with torch.no_grad(), models.autocast(), models.sampling() as gen:
                x, lab = draw(one_step(gen, models.condition, models.to_images), 100, models.sample_shape,
                              models.num_classes, seed=1, batch_size=cfg.eval.batch_size, device=models.device)
            if main_rank:
                grid = out / f"grid_step{trainer.step:06d}.png"
                save_samples(out / f"samples_step{trainer.step:06d}.npz", x, lab, grid)
                board.image("samples", grid, trainer.step)
        if tc.save_every and trainer.step % tc.save_every == 0 and trainer.step < max_steps:
            save()
        bar.update(1)
    bar.close()
    train_s = time.time() - t_train
    save()
    with torch.no_grad(), models.autocast(), models.sampling() as gen:
        x, lab = draw(one_step(gen, models.condition, models.to_images), cfg.eval.num_samples, models.sample_shape,
                      models.num_classes, seed=12345, batch_size=cfg.eval.batch_size, device=models.device)
    mem = models.peak_memory_mib()
    if main_rank:
        save_samples(out / "samples.npz", x, lab, out / "grid.png")
        summary = {"steps": trainer.step, "pairs_s": round(t_pairs, 1), "train_s": round(train_s, 1),
                   "total_s": round(time.time() - t_start, 1), "processes": models.world_size,
                   "engine": "deepspeed-zero3" if cfg.deepspeed.enabled else "plain", "device": str(models.device),
                   "skipped_steps": trainer.skipped_total, "peak_mem_mib_per_rank": mem,
                   "lpips_backbone": getattr(regression, "backbone", None) if regression is not None else None}
        cli.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        log.close()
        plot_log(out / "log.jsonl", out / "losses.png")
        print(f"done: {trainer.step} steps in {train_s:.0f} s; generator in {out / 'generator'}, samples in "
              f"{out / 'samples.npz'}")
    board.close()
    if feed is not None:
        feed.close()
    if hasattr(models, "close"):
        models.close()


if __name__ == "__main__":
    cli.main_guard(main)
