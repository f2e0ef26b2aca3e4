"""Lets `python examples/digits/<script>.py` run from a checkout without an install: puts the repo root on sys.path."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
