"""Write the digits training split as a real-data folder (engine/real_data.py): the real images a GAN loss's
discriminator sees. The held-out split stays out of it, as it stays out of every training.

    python examples/digits/make_real.py                       # -> assets/digits_real/ (shipped)
    python examples/digits/make_real.py --resolution 16 --out runs/digits_real_16
"""
if __name__ == "__main__":  # run as a script from a checkout: the repo root on sys.path
    import _bootstrap  # noqa: F401

import argparse
from pathlib import Path

from engine import cli
from engine.pairs_job import STORAGE
from engine.real_data import RealReader, expected, write_pixel_folder
from examples.digits.data import load_digits

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets" / "digits_real"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="real-data folder (replaced whole once written)")
    p.add_argument("--resolution", type=int, default=8, help="image side: a multiple of 8 (the data's own is 8)")
    p.add_argument("--dtype", default="float32", choices=tuple(STORAGE))
    args = p.parse_args()
    x, y = load_digits("train", args.resolution)
    source = {"dataset": "digits", "split": "train", "resolution": args.resolution, "seed": 0,
              "made_by": "examples/digits/make_real.py (scikit-learn's load_digits, examples/digits/data.py)"}
    out = write_pixel_folder(args.out, x, y, source, args.dtype)
    r = RealReader(out, expected("pixels", x.shape[1:]))
    print(f"{len(r)} training digits {list(x.shape[1:])} in {out}")


if __name__ == "__main__":
    cli.main_guard(main)
