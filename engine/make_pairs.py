"""Make the regression pairs (z, y = teacher ODE(z)) for a config, with a progress bar.

    python engine/make_pairs.py --config configs/digits.json --out runs/digits

Writes OUT/pairs/ (or data.pairs_dir when set): sharded .npy files and manifest.json. train.py calls the
same code when the pairs are missing.
"""
import _bootstrap  # noqa: F401

import time
from pathlib import Path

from engine import cli
from engine.builder import load_teacher
from engine.config import DMDConfig, load
from engine.pairs import PairReader, expected_manifest, write_pairs
from engine.text2image import load_text


def main():
    args = cli.parser(__doc__).parse_args()
    cfg = load(args.config, DMDConfig, args.set)
    out = cli.ensure_dir(args.out)
    folder = Path(cfg.data.pairs_dir) if cfg.data.pairs_dir else out / "pairs"
    teacher, h = load_teacher(cfg)
    teacher.eval()
    text = load_text(cfg, teacher)
    t0 = time.time()
    write_pairs(folder, teacher, h, cfg.data, text=text)
    num = text.num_prompts if text is not None else teacher.num_classes
    reader = PairReader(folder, expected_manifest(h, cfg.data, teacher.sample_shape, num, text))
    print(f"{len(reader)} pairs in {folder} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    cli.main_guard(main)
