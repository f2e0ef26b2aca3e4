"""Step time of the digits distillation: plain single process vs DeepSpeed ZeRO-3 (1 and 2 processes), one run.

    python bench/zero3_step.py --out runs/bench_zero3 [--steps 60] [--md runs/bench_zero3/table.md]

All runs share one pairs folder (made first, not timed) and use the same global batch (configs/digits.json and
configs/digits_zero3.json: 64 DM samples + 32 pairs per step). Step time is measured between the log line at
--skip steps and the last one, so start-up and the first (tracing) steps are left out. Peak memory per rank:
max RSS on CPU, torch.cuda.max_memory_allocated on GPU (from OUT/<run>/summary.json).
"""
import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the timing (start-up)")
    p.add_argument("--procs", type=int, default=2, help="processes of the multi-process ZeRO-3 run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: a shared machine's busy cores make more threads erratic)")
    p.add_argument("--reps", type=int, default=1, help="runs per variant, interleaved (the machine may be shared)")
    p.add_argument("--md", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py, ds = sys.executable, str(Path(sys.executable).parent / "deepspeed")
    pairs = out / "pairs"
    cores = os.cpu_count() or 1
    common = ["--max-steps", str(args.steps), "--quiet", "--set", f"data.pairs_dir={pairs}",
              "--set", "train.sample_every=0", "--set", "train.save_every=0", "--set", f"train.log_every={args.skip}",
              "--set", "eval.num_samples=100"]
    if not (pairs / "manifest.json").is_file():  # train.py checks the manifest against the teacher
        subprocess.run([py, "engine/make_pairs.py", "--config", "configs/digits.json", "--out", str(out / "pairs_run"),
                        "--set", f"data.pairs_dir={pairs}"], cwd=ROOT, check=True)
    # the same torch threads per process in every variant, so N processes use N times the cores
    thr = ["--set", f"train.threads={args.threads}"]
    runs = {
        "plain, 1 process": [py, "engine/train.py", "--config", "configs/digits.json", *thr],
        "ZeRO-3, 1 process": [py, "engine/train.py", "--config", "configs/digits_zero3.json", *thr],
        f"ZeRO-3, {args.procs} processes": [ds, "--num_gpus", str(args.procs), "--master_port", free_port(),
                                            "engine/train.py", "--config", "configs/digits_zero3.json", *thr],
    }
    done = {name: [] for name in runs}
    for rep in range(args.reps):  # A B C A B C ...: slow phases of a shared machine hit every variant
        for name, cmd in runs.items():
            run = out / f"{name.replace(', ', '_').replace(' ', '_').replace('-', '')}_rep{rep}"
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.time()
            subprocess.run([*cmd, "--out", str(run), "--overwrite", *common], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.time() - t0
            log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
            a, b = log[0], log[-1]
            summ = json.loads((run / "summary.json").read_text())
            done[name].append({"step_s": (b["time_s"] - a["time_s"]) / (b["step"] - a["step"]), "wall_s": wall,
                               "mem": summ["peak_mem_mib_per_rank"], "loss_g_last": b.get("loss_g")})
            print(name, rep, done[name][-1], flush=True)
    rows = []
    for name, rs in done.items():
        med = statistics.median(r["step_s"] for r in rs)
        rows.append({"run": name, "step_s": med, "step_s_all": [r["step_s"] for r in rs], "samples_per_s": 64 / med,
                     "wall_s": statistics.median(r["wall_s"] for r in rs),
                     "peak_mem_mib_per_rank": [max(m) for m in zip(*(r["mem"] for r in rs))],
                     "loss_g_last": [r["loss_g_last"] for r in rs]})
    (out / "zero3_step.json").write_text(json.dumps(rows, indent=2))
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'}, {cores} cores)"
    lines = [f"Digits distillation step time, {args.steps} steps (timed: steps {args.skip}..{args.steps}); "
             f"global batch 64 DM samples + 32 pairs; {args.threads} torch thread(s) per process; device: {dev}.", "",
             f"Median of {args.reps} interleaved run(s) per variant (all runs' step times in brackets).", "",
             "| run | step time (s) | samples/s | peak memory per rank (MiB) | wall incl. start-up (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        mem = ", ".join(f"{m:.0f}" for m in r["peak_mem_mib_per_rank"])
        every = ", ".join(f"{v:.2f}" for v in r["step_s_all"])
        lines.append(f"| {r['run']} | {r['step_s']:.3f} [{every}] | {r['samples_per_s']:.0f} | {mem} | {r['wall_s']:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
