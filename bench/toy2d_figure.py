"""The paper's Figure 3 on a 2-D mixture of two Gaussians at (-3, 0) and (3, 0), std 0.5.

    python bench/toy2d_figure.py --out runs/toy2d

Runs engine/train.py with configs/toy2d.json three ways (real score only; DMD without regression; full
DMD), each writing OUT/<variant>/samples.npz, then draws OUT/toy2d.png (also copied to bench/toy2d.png with
--publish) and prints the share of samples within 1.5 of each mode.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.toy import MODES, GaussianMixtureDenoiser, mode_shares  # noqa: E402

VARIANTS = {
    "real score only": ["train.fake_score=none", "train.reg_weight=0"],
    "DMD w/o regression": ["train.reg_weight=0"],
    "DMD (full)": [],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--publish", action="store_true", help="copy the figure and numbers into bench/")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    init = None
    for name, sets in VARIANTS.items():
        run = out / name.replace(" ", "_").replace("/", "").replace("(", "").replace(")", "")
        t0 = time.time()
        subprocess.run([sys.executable, "engine/train.py", "--config", "configs/toy2d.json", "--out", str(run), "--overwrite",
                        "--quiet", *sum((["--set", s] for s in sets), [])], cwd=ROOT, check=True)
        with np.load(run / "samples.npz") as f:
            s = f["samples"]
        results[name] = {"shares": mode_shares(torch.from_numpy(s)), "wall_s": round(time.time() - t0, 1), "samples": s}
        if init is None:
            from models.toy import ToyGenerator
            torch.manual_seed(0)  # train.py seeds with train.seed = 0 before building the generator
            g = ToyGenerator()     # so this is the starting point every variant shares
            with torch.no_grad():
                init = g(torch.randn(len(s), 2, generator=torch.Generator().manual_seed(12345))).numpy()
    data = GaussianMixtureDenoiser().sample_data(4000, torch.Generator().manual_seed(0)).numpy()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("target mixture", data), ("generator at start", init)] + [(k, v["samples"]) for k, v in results.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), sharey=True)
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.4)
        for m in MODES:
            ax.add_patch(plt.Circle(m, 1.5, fill=False, ls="--", lw=0.8, color="k"))
        sh = mode_shares(torch.from_numpy(np.asarray(pts)))
        ax.set_title(f"{title}\nleft {100 * sh[0]:.0f} %, right {100 * sh[1]:.0f} %", fontsize=9)
        ax.set_xlim(-6, 6), ax.set_ylim(-3, 3), ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "toy2d.png", dpi=110)
    summary = {k: {"left_share": v["shares"][0], "right_share": v["shares"][1], "wall_s": v["wall_s"]}
               for k, v in results.items()}
    (out / "toy2d.json").write_text(json.dumps(summary, indent=2))
    print("| variant | within 1.5 of (-3, 0) | within 1.5 of (3, 0) | wall time |\n|---|---|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {100 * v['left_share']:.1f} % | {100 * v['right_share']:.1f} % | {v['wall_s']:.0f} s |")
    if args.publish:
        shutil.copy(out / "toy2d.png", ROOT / "bench" / "toy2d.png")


if __name__ == "__main__":
    main()
