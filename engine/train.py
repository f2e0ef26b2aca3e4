"""Distribution Matching Distillation: teacher -> one-step generator.

    python engine/train.py --config configs/digits.json --out runs/digits [--max-steps N] [--resume]

The run folder gets config.json, log.jsonl, pairs/ (made first if missing), checkpoint/ (atomic),
generator/ (a diffusers folder for stock diffusers), samples.npz and grid.png at the end.
"""
import _bootstrap  # noqa: F401

import json
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine import cli
from engine.builder import DMDModels
from engine.config import DMDConfig, load, to_dict
from engine.losses import make_regression_loss
from engine.plots import plot_log
from engine.pairs import BatchSampler, PairReader, expected_manifest, write_pairs
from engine.sampling import draw, one_step, save_samples
from engine.trainer import DMDTrainer


def open_pairs(cfg, models, out: Path, progress=True) -> PairReader:
    """The run's pairs: read them if present (checked against this teacher and config), else make them."""
    folder = Path(cfg.data.pairs_dir) if cfg.data.pairs_dir else out / "pairs"
    expect = expected_manifest(models.teacher_hash, cfg.data, models.sample_shape, models.num_classes)
    if not (folder / "manifest.json").is_file():
        print(f"making {cfg.data.num_pairs} regression pairs in {folder}")
        write_pairs(folder, models.teacher, models.teacher_hash, cfg.data, progress)
    return PairReader(folder, expect)


def save_checkpoint(out: Path, models, trainer, sampler, extra: dict):
    """checkpoint/ is replaced atomically: written beside it, then renamed; the old one goes last."""
    tmp, final, old = out / ".checkpoint.partial", out / "checkpoint", out / ".checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"models": models.state_dict(), "rng": trainer.rng.get_state(), "step": trainer.step,
                "sampler": sampler.state_dict() if sampler else None, "torch_rng": torch.get_rng_state(), **extra},
               tmp / "state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    export_generator(out, models)


def export_generator(out: Path, models):
    tmp, final = out / ".generator.partial", out / "generator"
    shutil.rmtree(tmp, ignore_errors=True)
    models.sampling_generator().save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_checkpoint(out: Path, models, trainer, sampler):
    path = out / "checkpoint" / "state.pt"
    if not path.is_file():
        raise cli.DMDError(f"--resume: no checkpoint at {path}")
    s = torch.load(path, map_location=models.device, weights_only=True)
    models.load_state_dict(s["models"])
    trainer.rng.set_state(s["rng"])
    torch.set_rng_state(s["torch_rng"])
    trainer.step = s["step"]
    if sampler and s.get("sampler"):
        sampler.load_state_dict(s["sampler"])


def main():
    p = cli.parser(__doc__)
    p.add_argument("--max-steps", type=int, default=None, help="cap the number of generator updates")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    cfg = load(args.config, DMDConfig, args.set)
    tc = cfg.train
    max_steps = args.max_steps if args.max_steps is not None else tc.max_steps
    cli.set_threads(tc.threads)
    torch.manual_seed(tc.seed)
    out = cli.ensure_dir(args.out)
    cli.atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))
    t_start = time.time()
    models = DMDModels(cfg)
    reader = open_pairs(cfg, models, out, not args.quiet) if tc.reg_weight > 0 else None
    t_pairs = time.time() - t_start
    regression = make_regression_loss(tc) if reader is not None else None
    sampler = BatchSampler(len(reader), tc.reg_batch_size, tc.seed) if reader is not None else None
    trainer = DMDTrainer(models, tc, regression, reader, tc.seed)
    if args.resume:
        load_checkpoint(out, models, trainer, sampler)
        print(f"resumed at step {trainer.step}")
    elif tc.fake_warmup_steps and tc.dm_weight > 0 and tc.fake_score == "learned":
        with tqdm(total=tc.fake_warmup_steps, desc="fake-score warm-up", disable=args.quiet) as bar:
            trainer.warmup_fake(tc.fake_warmup_steps, bar)
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=max_steps, initial=trainer.step, desc=cfg.name, disable=args.quiet, dynamic_ncols=True)
    t_train = time.time()
    n_seen = 0
    acc: dict = {}  # running sums since the last log line, so the log shows means, not single noisy steps
    while trainer.step < max_steps:
        ref = None
        if reader is not None:
            ref = tuple(a.to(models.device) for a in reader.batch(sampler.next()))
            if models.num_classes is None:
                ref = (ref[0], ref[1], None)
        logs = trainer.train_step(ref)
        n_seen += tc.batch_size
        bad = [k for k, v in logs.items() if not torch.isfinite(torch.tensor(v))]
        if bad:
            raise cli.DMDError(f"step {trainer.step}: non-finite {', '.join(bad)}; last good checkpoint kept")
        for k, v in logs.items():
            acc[k] = acc.get(k, 0.0) + v
        acc["_n"] = acc.get("_n", 0) + 1
        if trainer.step % tc.log_every == 0 or trainer.step == max_steps:
            rate = n_seen / max(time.time() - t_train, 1e-9)
            n = acc.pop("_n")
            means = {k: v / n for k, v in acc.items()}
            acc = {}
            log.write(json.dumps({"step": trainer.step, **means, "samples_per_s": rate,
                                  "time_s": time.time() - t_start}) + "\n")
            log.flush()
            bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k.startswith("loss")} | {"img/s": f"{rate:.0f}"})
        if tc.sample_every and trainer.step % tc.sample_every == 0:
            x, lab = draw(one_step(models.sampling_generator()), 100, models.sample_shape, models.num_classes, seed=1)
            save_samples(out / f"samples_step{trainer.step:06d}.npz", x, lab, out / f"grid_step{trainer.step:06d}.png")
        if tc.save_every and trainer.step % tc.save_every == 0 and trainer.step < max_steps:
            save_checkpoint(out, models, trainer, sampler, {"config": to_dict(cfg)})
        bar.update(1)
    bar.close()
    train_s = time.time() - t_train
    save_checkpoint(out, models, trainer, sampler, {"config": to_dict(cfg)})
    gen = models.sampling_generator().eval()
    x, lab = draw(one_step(gen), cfg.eval.num_samples, models.sample_shape, models.num_classes, seed=12345)
    save_samples(out / "samples.npz", x, lab, out / "grid.png")
    summary = {"steps": trainer.step, "pairs_s": round(t_pairs, 1), "train_s": round(train_s, 1),
               "total_s": round(time.time() - t_start, 1),
               "lpips_backbone": getattr(regression, "backbone", None) if regression is not None else None}
    cli.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    log.close()
    plot_log(out / "log.jsonl", out / "losses.png")
    print(f"done: {trainer.step} steps in {train_s:.0f} s; generator in {out / 'generator'}, samples in "
          f"{out / 'samples.npz'}")


if __name__ == "__main__":
    cli.main_guard(main)
