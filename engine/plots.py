"""Loss curves from a run's log.jsonl, as one PNG (a picture says more than the numbers in the log)."""
from __future__ import annotations

import json
from pathlib import Path


def plot_log(log_path, png_path, keys=("loss_dm", "loss_reg", "loss_fake", "grad_norm_g", "grad_norm_f")):
    rows = [json.loads(l) for l in Path(log_path).read_text().splitlines() if l.strip()]
    keys = [k for k in keys if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6))
    for ax, k in zip(list(axes) if len(keys) > 1 else [axes], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
