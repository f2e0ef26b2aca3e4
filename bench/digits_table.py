"""The digits quality table (paper Table 2 in miniature), with wall times.

    python bench/digits_table.py --out runs/table            # teacher rows, DMD full and both ablations
    python bench/digits_table.py --demo --out runs/demo      # what `make demo` runs (full DMD only, shorter)

Each DMD variant is `engine/train.py` with the shipped config and one --set override; all variants share
one pairs folder. Rows: real held-out digits (the floor), the teacher's ODE sampler, the teacher in one
step, DMD full, DMD without regression, DMD without distribution matching. Writes OUT/table.json and
OUT/table.md and prints the table.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import DMDConfig, load  # noqa: E402

VARIANTS = {  # name -> overrides of configs/digits.json
    "DMD full": [],
    "DMD w/o regression": ["train.reg_weight=0"],
    "DMD w/o distribution matching": ["train.dm_weight=0"],
}


def sh(*args) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, check=True)
    return time.time() - t0


def evaluate(npz: Path) -> dict:
    js = npz.with_suffix(".metrics.json")
    sh("examples/digits/evaluate.py", npz, "--json", js)
    return json.loads(js.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/digits.json")
    p.add_argument("--steps", type=int, default=None, help="generator updates per DMD run (default: config)")
    p.add_argument("--demo", action="store_true", help="full DMD only, config's demo length")
    p.add_argument("--variants", nargs="*", default=None, help="subset of: " + ", ".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], help="extra override for every DMD run")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load(ROOT / args.config, DMDConfig, args.set)
    variants = ["DMD full"] if args.demo else (args.variants or list(VARIANTS))
    pairs = out / "pairs"
    common = ["--set", f"data.pairs_dir={pairs}", *sum((["--set", s] for s in args.set), [])]
    if args.steps:
        common += ["--max-steps", args.steps]
    rows = []
    t_all = time.time()

    # the floor: held-out real digits against the training digits
    js = out / "real_heldout.metrics.json"
    sh("examples/digits/evaluate.py", "--real", "heldout", "--json", js)
    rows.append({"row": "real held-out digits (floor)", "nfe": "-", **json.loads(js.read_text())})

    # DMD runs first: the first one makes the shared pairs (its time includes them)
    runs = {}
    for name in variants:
        run = out / name.replace(" ", "_").replace("/", "")
        dt = sh("engine/train.py", "--config", ROOT / args.config, "--out", run, "--overwrite", "--quiet", *common,
                *sum((["--set", s] for s in VARIANTS[name]), []))
        runs[name] = (run, dt)
    teacher_run = next(iter(runs.values()))[0]

    # the teacher, multi-step and one step (the generator's starting point)
    ts, st = cfg.eval.teacher_sampler, cfg.eval.teacher_steps
    npz = out / "teacher_multistep.npz"
    dt = sh("engine/infer.py", "--checkpoint", teacher_run, "--teacher", "--sampler", ts, "--steps", st,
            "--num", cfg.eval.num_samples, "--batch-size", cfg.eval.batch_size, "--out", npz,
            "--grid", out / "teacher_multistep.png")
    nfe = st if ts == "ddim" else 2 * st - 1
    rows.append({"row": f"teacher, {ts} {st} steps", "nfe": nfe, "wall_s": round(dt, 1), **evaluate(npz)})
    npz = out / "teacher_onestep.npz"
    dt = sh("engine/infer.py", "--checkpoint", teacher_run, "--teacher", "--sampler", "ddim", "--steps", 1,
            "--num", cfg.eval.num_samples, "--batch-size", cfg.eval.batch_size, "--out", npz,
            "--grid", out / "teacher_onestep.png")
    rows.append({"row": "teacher, 1 step", "nfe": 1, "wall_s": round(dt, 1), **evaluate(npz)})

    for name, (run, dt) in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        rows.append({"row": name, "nfe": 1, "wall_s": round(dt, 1), "train_s": summary["train_s"],
                     "steps": summary["steps"], "lpips_backbone": summary["lpips_backbone"] or "n/a (no regression)",
                     **evaluate(run / "samples.npz")})

    lines = ["| | NFE | Frechet distance (digits features) | class accuracy | wall time |", "|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
        if "train_s" in r:
            wall += f" (train {r['train_s']:.0f} s, {r['steps']} steps; LPIPS backbone: {r['lpips_backbone']})"
        lines.append(f"| {r['row']} | {r['nfe']} | {r['fd']:.2f} ± {r['fd_std']:.2f} | {100 * r['accuracy']:.1f} % | {wall} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print("\n" + table)
    print(f"\nwall time, everything: {time.time() - t_all:.0f} s; grids and samples in {out}")


if __name__ == "__main__":
    main()
