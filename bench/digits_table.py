"""The digits quality table: the paper's Table 2 in miniature, DMD2's rows, two judges, several training seeds.

    python bench/digits_table.py --out runs/table                           # teacher, DMD and the DMD2 rows, 1 seed
    python bench/digits_table.py --out runs/table --seeds 0 1 2 --jobs 2    # 3 training seeds a row, 2 runs at once
    python bench/digits_table.py --demo --out runs/demo                     # what `make demo` runs
    python bench/digits_table.py --out runs/abl --variants "DMD w/o regression" "DMD w/o distribution matching"

Each row is `engine/train.py` with a shipped config and its overrides, once per training seed (train.seed);
the DMD rows share one pairs folder, made first. Every model (the teacher and each trained generator) then
draws the same sample sets (--sample-seeds: the same seeds and labels for all, so rows differ by their models
more than by their draws; a several-step generator draws one noise per step, so its noise is not the
teacher's), and each set is scored by examples/digits/evaluate.py with two judges: FD in the
evaluation classifier's features (judge 1, on which the digits settings were chosen) and FD in an
independently built and trained autoencoder's features (judge 2). A run's score is its mean over the sample
sets; a row shows the mean and sample standard deviation of its training seeds' scores (the teacher rows, and
rows of one seed: over the sample sets; one set: over evaluation subsets). Writes OUT/table.json and
OUT/table.md and prints the table.
A run folder that already holds a finished run of the same config and length is scored again, not retrained, so
a table stopped halfway continues where it was when started again with the same arguments (such a row's wall
time is the one in its run's summary.json).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import DMDConfig, load, to_dict  # noqa: E402

FOUR_STEPS = "train.generator_timesteps=[999,749,499,249]"
VARIANTS = {  # row -> (config, overrides)
    "DMD": ("configs/digits.json", []),
    "DMD2": ("configs/digits_dmd2.json", []),
    "DMD2 w/o GAN": ("configs/digits_dmd2.json", ["train.gan_weight_generator=0", "train.gan_weight_fake=0"]),
    "DMD2, 4 steps": ("configs/digits_dmd2.json", [FOUR_STEPS]),
    "DMD w/o regression": ("configs/digits.json", ["train.reg_weight=0"]),
    "DMD w/o distribution matching": ("configs/digits.json", ["train.dm_weight=0"]),
}
DEFAULT, DEMO = ["DMD", "DMD2", "DMD2 w/o GAN", "DMD2, 4 steps"], ["DMD"]
SCORES = ("fd", "fd2", "accuracy")
# where the gaps come from (examples/digits/evaluate.py): whole-set FD, its means' term, the spreads
BREAKDOWN = ("fd_all", "fd_all_mean", "fd_spread", "fd2_all", "fd2_all_mean", "fd2_spread", "pixel_spread")


def sh(*args, threads: int | None = None) -> float:
    t0 = time.time()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, check=True, env=env)
    return time.time() - t0


def evaluate(npz: Path) -> dict:
    js = npz.with_suffix(".metrics.json")
    sh("examples/digits/evaluate.py", npz, "--json", js)
    return json.loads(js.read_text())


def finished(run: Path, config: str, overrides: list[str], steps: int | None) -> float | None:
    """The wall time of a finished run in `run` of exactly this config and length, else None (train it). Only the
    config is compared, not the code: after a change to the engine, give the table a new --out. A key the run's
    config.json lacks counts at its default (a key added to the engine later, whose default is the old code)."""
    cfg = load(ROOT / config, DMDConfig, overrides)
    try:
        summary, written = json.loads((run / "summary.json").read_text()), run / "config.json"
        same = to_dict(load(written, DMDConfig)) == to_dict(cfg)
        # a later, unfinished --resume rewrites config.json after the summary it has not replaced yet
        whole = (run / "samples.npz").is_file() and (run / "summary.json").stat().st_mtime >= written.stat().st_mtime
        wall = float(summary["total_s"])
        done = summary["steps"] == (steps if steps is not None else cfg.train.max_steps)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return wall if same and whole and done else None


def steps_of(config: str, overrides: list[str]) -> int:
    return len(load(ROOT / config, DMDConfig, overrides).train.generator_timesteps) or 1


def mean_of(sets: list[dict]) -> dict:
    """One model's score from its sample sets: the mean, and the spread over the sets (one set: over subsets)."""
    present = [k for k in BREAKDOWN if all(k in s for s in sets)]  # metrics written before it lack the breakdown
    out = {k: float(np.mean([s[k] for s in sets])) for k in (*SCORES, *present)}
    out.update({k + "_std": float(np.std([s[k] for s in sets], ddof=1)) if len(sets) > 1 else sets[0][k + "_std"]
                for k in SCORES if k != "accuracy"})
    return out


def aggregate(name: str, nfe, scored: list[dict], **extra) -> dict:
    """One table row from the scores of each seed (one seed: its own spread, over sample sets or subsets)."""
    return {"row": name, "nfe": nfe, "seeds": len(scored), "per_seed": scored, **extra, **mean_of(scored)}


def render(rows: list[dict], seeds: int, sets: int) -> str:
    over = f"the {sets} sample sets" if sets > 1 else "evaluation subsets of the one sample set"
    runs = f"{seeds} training seeds, each scored by its mean over the sample sets" if seeds > 1 else over
    note = (f"FD: mean ± std over {runs}; the teacher rows: over {over}; the floor: one set. Every model draws "
            f"the same {sets} sample set{'s' if sets > 1 else ''} (--sample-seeds).")
    lines = ["| | NFE | FD, classifier features (judge 1) | FD, autoencoder features (judge 2) "
             "| class accuracy | wall time per run |", "|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
        if "train_s" in r:
            wall += f" (train {r['train_s']:.0f} s, {r['steps']} updates)"
        lines.append(f"| {r['row']} | {r['nfe']} | {r['fd']:.2f} ± {r['fd_std']:.2f} | {r['fd2']:.2f} ± "
                     f"{r['fd2_std']:.2f} | {100 * r['accuracy']:.1f} % | {wall} |")
    return "\n".join(lines + ["", note] + breakdown(rows))


def breakdown(rows: list[dict]) -> list[str]:
    """A second table: each model's whole sample sets against the training split (means over its sets and seeds)."""
    rows = [r for r in rows if all(k in r for k in BREAKDOWN)]
    if not rows:
        return []
    lines = ["", "Where the gaps come from (whole sample sets against the training split; spread: the trace of the "
             "covariance over the real digits'; the floor's one set holds the 360 held-out digits, fewer than a "
             "model's set, so FD's sample-count bias is larger in its row):", "",
             "| | judge 1: FD = means + covariances | judge 1 spread | judge 2: FD = means + covariances "
             "| judge 2 spread | pixel spread |", "|---|---|---|---|---|---|"]
    for r in rows:
        fd = [f"{r[k + '_all']:.3f} = {r[k + '_all_mean']:.3f} + {r[k + '_all'] - r[k + '_all_mean']:.3f}"
              for k in ("fd", "fd2")]
        lines.append(f"| {r['row']} | {fd[0]} | {r['fd_spread']:.3f} | {fd[1]} | {r['fd2_spread']:.3f} | "
                     f"{r['pixel_spread']:.3f} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="generator updates per run (default: each config's)")
    p.add_argument("--demo", action="store_true", help="the DMD row only, one seed")
    p.add_argument("--variants", nargs="*", default=None, help="rows to train (default: " + ", ".join(DEFAULT) +
                   "); any of: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0], help="training seeds per row (default: 0)")
    p.add_argument("--sample-seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="sampling seeds: every model draws these sample sets (default: 0 1 2)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, each with cores / jobs threads")
    p.add_argument("--set", action="append", default=[], help="extra override for every run")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = DEMO if args.demo else (args.variants or DEFAULT)
    seeds = list(dict.fromkeys(args.seeds))  # two runs of one seed would share a run folder
    sample_seeds = list(dict.fromkeys(args.sample_seeds))
    if not seeds or not sample_seeds:
        p.error("--seeds and --sample-seeds need at least one seed each")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, args.jobs))
    pairs = out / "pairs"
    every = [f"data.pairs_dir={pairs}", f"train.threads={threads}", *args.set]  # overrides of every run
    every_sets = sum((["--set", s] for s in every), [])
    common = every_sets + (["--max-steps", args.steps] if args.steps is not None else [])
    t_all = time.time()

    # the floor: held-out real digits against the training digits
    js = out / "real_heldout.metrics.json"
    sh("examples/digits/evaluate.py", "--real", "heldout", "--json", js)
    rows = [aggregate("real held-out digits (floor)", "-", [json.loads(js.read_text())])]

    # the shared pairs first (the DMD rows regress on them), then every run, `--jobs` at a time
    base = load(ROOT / "configs/digits.json", DMDConfig, args.set)
    if any(load(ROOT / VARIANTS[n][0], DMDConfig, VARIANTS[n][1] + args.set).train.reg_weight > 0 for n in names):
        sh("engine/make_pairs.py", "--config", ROOT / "configs/digits.json", "--out", out / "pairs_job", *every_sets)
    runs = [(n, s, out / f"{n.replace(' ', '_').replace('/', '').replace(',', '')}_seed{s}") for n in names
            for s in seeds]

    n, bs = base.eval.num_samples, base.eval.batch_size

    def train(job):
        """Trains a run (or finds it finished), then draws and scores its generator's sample sets."""
        name, seed, run = job
        config, overrides = VARIANTS[name]
        sets = sum((["--set", o] for o in overrides), [])
        wall = finished(run, config, every + overrides + [f"train.seed={seed}"], args.steps)
        if wall is not None:
            print(f"{run.name}: finished run of this config found, scored again, not retrained", flush=True)
        else:
            wall = sh("engine/train.py", "--config", ROOT / config, "--out", run, "--overwrite", "--quiet", *common,
                      *sets, "--set", f"train.seed={seed}", threads=threads)
        scored = []
        for s in sample_seeds:
            npz = run / f"samples_seed{s}.npz"
            sh("engine/infer.py", "--checkpoint", run, "--num", n, "--batch-size", bs, "--seed", s, "--out", npz,
               threads=threads)
            scored.append(evaluate(npz))
        return wall, mean_of(scored)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = list(pool.map(train, runs))

    # the teacher, multi-step and one step (the generator's starting point), on the same sample sets
    ts, st = base.eval.teacher_sampler, base.eval.teacher_steps
    for label, sampler, steps, nfe in ((f"teacher, {ts} {st} steps", ts, st, st if ts == "ddim" else 2 * st - 1),
                                       ("teacher, 1 step", "ddim", 1, 1)):
        scored, walls_t = [], []
        for s in sample_seeds:
            npz = out / f"teacher_{sampler}{steps}_seed{s}.npz"
            walls_t.append(sh("engine/infer.py", "--checkpoint", runs[0][2], "--teacher", "--sampler", sampler,
                              "--steps", steps, "--num", n, "--batch-size", bs, "--seed", s, "--out", npz,
                              "--grid", npz.with_suffix(".png")))
            scored.append(evaluate(npz))
        rows.append(aggregate(label, nfe, scored, wall_s=round(float(np.mean(walls_t)), 1)))

    for name in names:
        mine = [(r, w, sc) for (n_, _, r), (w, sc) in zip(runs, done) if n_ == name]
        summaries = [json.loads((r / "summary.json").read_text()) for r, _, _ in mine]
        config, overrides = VARIANTS[name]
        rows.append(aggregate(name, steps_of(config, overrides + args.set), [sc for _, _, sc in mine],
                              wall_s=round(float(np.mean([w for _, w, _ in mine])), 1), steps=summaries[0]["steps"],
                              train_s=round(float(np.mean([s["train_s"] for s in summaries])), 1)))

    table = render(rows, len(seeds), len(sample_seeds))
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print("\n" + table)
    teacher = rows[1]
    for r in rows[3:]:
        print(f"{r['row']}: FD / teacher's {teacher['nfe']}-NFE FD = {r['fd'] / teacher['fd']:.3f} (judge 1), "
              f"{r['fd2'] / teacher['fd2']:.3f} (judge 2); accuracy {100 * (r['accuracy'] - teacher['accuracy']):+.1f} "
              f"points")
    print(f"\nwall time, everything: {time.time() - t_all:.0f} s; grids and samples in {out}")


if __name__ == "__main__":
    main()
