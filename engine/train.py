"""Distribution Matching Distillation: teacher -> one-step generator.

    python engine/train.py --config configs/digits.json --out runs/digits [--max-steps N] [--resume]
    deepspeed [--num_gpus N | --hostfile H] engine/train.py --config configs/digits_zero3.json --out runs/z3

One trainer, two backends: plain PyTorch on one process, or DeepSpeed ZeRO-3 (deepspeed.enabled in the config)
on one or many processes. The run folder gets config.json, log.jsonl, tb/ (TensorBoard), pairs/ (made first if
missing), checkpoint/ (plain) or checkpoints/ (DeepSpeed, newest K kept), generator/ (a diffusers folder for
stock diffusers), fake_score/ (for model.init_from), samples.npz and grid.png at the end.
"""
import _bootstrap  # noqa: F401

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine import checkpoint, cli, faults, preempt, runfolder
from engine.checks import check_config
from engine.config import DMDConfig, load, to_dict
from engine.errors import DMDError
from engine.files import atomic_write_text
from engine.losses import make_regression_loss
from engine.pair_loader import make_pair_feed
from engine.pairs import BatchSampler, PairReader, expected_manifest, write_pairs
from engine.real_data import make_real_feed, open_real
from engine.plots import plot_log
from engine.runlog import RunLog
from engine.fast_sampler import OneStepSampler, SamplePath
from engine.sampling import draw, noise_shape, save_samples
from engine.text2image import DecodedRegression
from engine.trainer import DMDTrainer

# x86 CPUs run subnormal floats some 100x slower, and DMD2's passes through the fake score make them (a digits
# fake-score update with the GAN: 0.15 s flushed, 1-13 s and growing without). Flushed, values below ~1e-38
# become 0 (README: DMD2).
# Set before torch starts its worker threads, which keep the setting they start with.
torch.set_flush_denormal(True)


def parse_args():
    p = cli.parser(__doc__)
    p.add_argument("--max-steps", type=int, default=None, help="cap the number of generator updates")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty OUT (pairs/ is kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="print the per-rank memory plan, write OUT/plan.json and "
                   "stop; loads no weights (engine/plan.py)")
    p.add_argument("--processes", type=int, default=None, help="--dry-run: processes to plan for (default WORLD_SIZE or 1)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="--dry-run: GPU memory per process (default: this machine's GPU, else 80)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args()


def build_backend(cfg, init_from: str | None = None):
    """The backend, decided here only: deepspeed.enabled picks ZeRO-3, else the plain one-process backend.
    init_from: a run to take the generator and fake score from (engine/warmstart.py)."""
    if cfg.deepspeed.enabled:
        from engine.zero import ZeroBackend
        return ZeroBackend(cfg, init_from)
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1:
        raise DMDError(f"started as {n} processes but deepspeed.enabled is false in the config "
                       f"(set it, e.g. --set deepspeed.enabled=true, or run one process)")
    from engine.plain import PlainBackend, resolve_device
    return PlainBackend(cfg, resolve_device(cfg.train.device), init_from=init_from)


def open_pairs(cfg, models, out: Path, progress=True) -> PairReader:
    """The run's pairs: read them if present (checked against this teacher and config), else make them. With
    several processes every one makes its share of the missing shards with a whole teacher (engine/pairs_job.py),
    so no process waits at a collective longer than the shares differ; a job killed midway keeps its complete
    shards. Each process holds a whole fp32 teacher meanwhile; engine/make_pairs.py does the same as a job of its
    own, before training."""
    folder = Path(cfg.data.pairs_dir) if cfg.data.pairs_dir else out / "pairs"
    expect = expected_manifest(models.teacher_hash, cfg.data, models.sample_shape, models.num_classes, models.text)
    # every process gets the same answer here: the manifest appears only once all of them are inside write_pairs
    if not (folder / "manifest.json").is_file():
        if models.is_main:
            print(f"making {cfg.data.num_pairs} regression pairs in {folder}")
        teacher, text = models.whole_teacher()
        write_pairs(folder, teacher, models.teacher_hash, cfg.data, progress, text, group=models)
    return PairReader(folder, expect)


def regression_parts(cfg, models, out: Path, quiet: bool):
    """(pairs reader, batch sampler, regression loss), or Nones when train.reg_weight is 0."""
    tc = cfg.train
    if tc.reg_weight <= 0:
        return None, None, None
    reader = open_pairs(cfg, models, out, not quiet)
    regression = make_regression_loss(tc).to(models.device)
    if models.text is not None:  # latent models: LPIPS on decoded images
        regression = DecodedRegression(regression, models.to_images)
    return reader, BatchSampler(len(reader), tc.reg_batch_size, tc.seed), regression


def sample_images(models, n: int, seed: int, batch_size: int):
    """n samples of the sampling generator (EMA when on), decoded; every process takes part."""
    text = models.text
    prep = (lambda c: text.encoder.token_ids([text.prompts[i] for i in c.tolist()])) if text else (lambda c: c)
    with torch.no_grad(), models.autocast(), models.sampling() as gen:
        path = SamplePath(gen, text.encoder.text_encoder if text else None, text.decoder if text else None)
        sampler = OneStepSampler(path, models.device, dtype=None, compile=False, cuda_graphs=False, max_batch=batch_size)
        return draw(lambda z, c: sampler(z, prep(c) if c is not None else None), n, noise_shape(gen, models.sample_shape),
                    models.num_classes, seed=seed, batch_size=batch_size, device=models.device)


def prompts_of(models, labels):
    """A text model's prompts for sampled prompt indices (grid captions), else None."""
    return [models.text.prompts[int(i)] for i in labels] if models.text is not None else None


def train_loop(cfg, models, trainer, feed, out: Path, max_steps: int, quiet: bool, log: RunLog, save) -> bool:
    """Trains up to max_steps; returns False when stopped early by SIGTERM/SIGUSR1 (a checkpoint is written)."""
    tc = cfg.train
    stop = preempt.StopRequest()
    bar = tqdm(total=max_steps, initial=trainer.step, desc=cfg.name, disable=quiet, dynamic_ncols=True)
    t_train, n_seen = time.time(), 0
    while trainer.step < max_steps:
        ref = None
        if feed is not None:
            z_ref, y_ref, c_ref = feed.next()  # this process's slice, on its device
            ref = (z_ref, y_ref, models.condition(c_ref) if models.num_classes else None)
        with models.autocast():
            log.add(trainer.train_step(ref))
        n_seen += tc.batch_size
        if trainer.skips_in_row >= tc.max_consecutive_skips:
            raise DMDError(f"step {trainer.step}: {trainer.skips_in_row} non-finite steps in a row (limit "
                           f"train.max_consecutive_skips = {tc.max_consecutive_skips}); stopped, last good "
                           f"checkpoint kept")
        faults.after_step(trainer.step)
        if trainer.step % tc.log_every == 0 or trainer.step == max_steps:
            rate = n_seen / max(time.time() - t_train, 1e-9)
            extra = {**models.lrs(), "skipped_total": trainer.skipped_total,
                     **{f"peak_mem_mib_rank{r}": m for r, m in enumerate(models.peak_memory_mib())}}
            means = log.line(trainer.step, rate, extra)
            bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k.startswith("loss")} | {"img/s": f"{rate:.0f}"})
        if tc.sample_every and trainer.step % tc.sample_every == 0:
            n = tc.sample_count or (16 if models.text is not None else 100)
            x, lab = sample_images(models, n, 1, cfg.eval.batch_size)
            if models.is_main:
                grid, captions = out / f"grid_step{trainer.step:06d}.png", prompts_of(models, lab)
                save_samples(out / f"samples_step{trainer.step:06d}.npz", x, lab, grid, captions=captions)
                log.board.image("samples", grid, trainer.step)
                if captions:
                    log.board.text("samples/prompts", "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions)),
                                   trainer.step)
        saved = tc.save_every and trainer.step % tc.save_every == 0 and trainer.step < max_steps
        if saved:
            save()
        bar.update(1)
        if models.any_rank(stop.requested) and trainer.step < max_steps:
            if not saved:
                save()
            bar.close()
            stop.release()
            if models.is_main:
                print(f"stopped by {stop.signal or 'a signal to another process'} after step {trainer.step}: "
                      f"checkpoint written; continue with --resume", flush=True)
            return False
    bar.close()
    stop.release()
    return True


def main():
    # 1. set-up: config, backend, run folder
    args = parse_args()
    cfg = load(args.config, DMDConfig, args.set)
    tc = cfg.train
    if args.dry_run:  # the plan before the launch (engine/plan.py): config files only, writes only OUT/plan.json
        from engine.plan import dry_run
        return dry_run(cfg, args.out, args.processes, args.gpu_memory)
    if args.processes is not None or args.gpu_memory is not None:
        raise DMDError("--processes and --gpu-memory belong to --dry-run")
    check_config(cfg, args)
    max_steps = args.max_steps if args.max_steps is not None else tc.max_steps
    cli.set_threads(tc.threads)
    out = Path(args.out)
    changes = runfolder.check(out, args.resume, args.overwrite, to_dict(cfg))  # every process alike
    t_start = time.time()
    torch.manual_seed(tc.seed)
    models = build_backend(cfg, None if args.resume else cfg.model.init_from)  # a resume has its own weights
    if cfg.deepspeed.enabled:
        torch.manual_seed(tc.seed + models.rank)  # dropout masks: each process its own stream
    quiet = args.quiet or not models.is_main
    counts = models.gather(models.local_param_counts())  # what each process holds (tests, benchmarks)
    if models.is_main and args.overwrite:
        runfolder.clear(out)
    models.barrier()

    # 2. pairs and the regression loss; then the run's own files (a run refused so far leaves none)
    reader, sampler, regression = regression_parts(cfg, models, out, quiet)
    real_reader, real_sampler = open_real(cfg, models)
    t_pairs = time.time() - t_start
    if models.is_main:
        if not args.resume:  # a resumed run's config.json changes only once its checkpoint has loaded
            atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))
        atomic_write_text(out / "partition.json", json.dumps(counts, indent=2))

    # 3. trainer: resumed from the newest checkpoint, or with its fake-score warm-up
    trainer = DMDTrainer(models, tc, regression, reader, tc.seed)
    trainer.nan_steps = faults.nan_steps()
    if args.resume:
        checkpoint.load(out, models, trainer, sampler, real_sampler)
        if models.is_main:
            print(f"resumed at step {trainer.step}" + (f", changed: {', '.join(changes)}" if changes else ""))
            atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))
    feed = make_pair_feed(cfg.data.loader, reader, sampler, models) if reader is not None else None  # after resume
    if real_reader is not None:
        trainer.real = make_real_feed(cfg.data.loader, real_reader, real_sampler, models)
    fresh_fake = not (args.resume or cfg.model.init_from)  # an init_from run's fake score follows its generator
    if fresh_fake and tc.fake_warmup_steps and tc.dm_weight > 0 and tc.fake_score == "learned":
        with tqdm(total=tc.fake_warmup_steps, desc="fake-score warm-up", disable=quiet) as bar, models.autocast():
            trainer.warmup_fake(tc.fake_warmup_steps, bar)

    # 4. the loop
    log = RunLog(out, models.is_main, t_start)
    if args.resume:
        log.note({"resumed_from": trainer.step, "config_changes": changes})
    save = lambda: checkpoint.save(out, models, trainer, sampler, {"config": to_dict(cfg)}, cfg.deepspeed.keep_checkpoints,
                                   real_sampler)
    t_train = time.time()
    finished = train_loop(cfg, models, trainer, feed, out, max_steps, quiet, log, save)
    train_s = time.time() - t_train
    if not finished:
        shutdown(log, feed, models, trainer.real)
        sys.exit(preempt.EXIT_PREEMPTED)

    # 5. final checkpoint and export, samples, summary
    save()
    x, lab = sample_images(models, cfg.eval.num_samples, 12345, cfg.eval.batch_size)
    mem = models.peak_memory_mib()
    if models.is_main:
        save_samples(out / "samples.npz", x, lab, out / "grid.png", captions=prompts_of(models, lab))
        summary = {"steps": trainer.step, "pairs_s": round(t_pairs, 1), "train_s": round(train_s, 1),
                   "total_s": round(time.time() - t_start, 1), "processes": models.world_size,
                   "engine": models.name, "device": str(models.device),
                   "skipped_steps": trainer.skipped_total, "peak_mem_mib_per_rank": mem,
                   "lpips_backbone": getattr(regression, "backbone", None) if regression is not None else None}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        plot_log(out / "log.jsonl", out / "losses.png")
        print(f"done: {trainer.step} steps in {train_s:.0f} s; generator in {out / 'generator'}, samples in "
              f"{out / 'samples.npz'}")
    shutdown(log, feed, models, trainer.real)


def shutdown(log, feed, models, real=None):
    log.close()
    for f in (feed, real):
        if f is not None:
            f.close()
    models.close()


if __name__ == "__main__":
    cli.main_guard(main)
