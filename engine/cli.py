"""What every entry point shares: --config/--out/--set arguments, one-line errors and a non-zero exit."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .config import ConfigError

EXIT_BAD_INPUT = 2


class DMDError(RuntimeError):
    """An error the user can fix (bad data, missing file); printed as one line, no traceback."""


def parser(description: str, config: bool = True, out: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    if config:
        p.add_argument("--config", required=True, help="JSON config file")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable); VALUE is parsed as JSON when it can be")
    if out:
        p.add_argument("--out", required=True, help="run folder (created if missing)")
    return p


def set_threads(n: int):
    if n > 0:
        torch.set_num_threads(n)


def main_guard(fn):
    """Run fn(); known user errors become 'error: ...' on stderr and exit code 2."""
    from models.denoiser import ModelFolderError
    try:
        return fn()
    except (ConfigError, DMDError, ModelFolderError, FileNotFoundError) as e:
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"file not found: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def ensure_dir(path: str | Path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def atomic_write_text(path: str | Path, text: str):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
