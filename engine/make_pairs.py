"""Make the regression pairs (z, y = teacher ODE(z)) for a config, with a progress bar.

    python engine/make_pairs.py --config configs/digits.json --out runs/digits

Writes OUT/pairs/ (or data.pairs_dir when set): sharded .npy files and manifest.json. train.py calls the
same code when the pairs are missing. Complete pairs for this teacher and config are kept (nothing to do);
pairs made for another one are refused in one line unless --overwrite.
"""
import _bootstrap  # noqa: F401

import time
from pathlib import Path

from engine import cli
from engine.config import DMDConfig, load
from engine.errors import DMDError, PairsError
from engine.files import ensure_dir
from engine.kinds import load_teacher
from engine.pairs import PairReader, expected_manifest, write_pairs
from engine.text2image import condition_count, load_text


def main():
    p = cli.parser(__doc__)
    p.add_argument("--overwrite", action="store_true", help="replace complete pairs made for another teacher or config")
    args = p.parse_args()
    cfg = load(args.config, DMDConfig, args.set)
    out = ensure_dir(args.out)
    folder = Path(cfg.data.pairs_dir) if cfg.data.pairs_dir else out / "pairs"
    teacher, h = load_teacher(cfg)
    text = load_text(cfg, teacher)
    expect = expected_manifest(h, cfg.data, teacher.sample_shape, condition_count(teacher, text), text)
    if (folder / "manifest.json").is_file():
        try:
            reader = PairReader(folder, expect)
            print(f"{len(reader)} pairs for this teacher and config are already complete in {folder}; nothing to do")
            return
        except PairsError as e:
            if not args.overwrite:
                raise DMDError(f"{folder} holds other or damaged pairs; pass --overwrite to remake them, or set "
                               f"data.pairs_dir elsewhere ({e})") from None
    t0 = time.time()
    write_pairs(folder, teacher, h, cfg.data, text=text)
    reader = PairReader(folder, expect)
    print(f"{len(reader)} pairs in {folder} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    cli.main_guard(main)
