"""What every entry point shares: --config/--out/--set arguments, one-line errors and a non-zero exit.
Only entry points import this module; library modules raise engine.errors.DMDError and its kinds."""
from __future__ import annotations

import argparse
import sys

import torch

from .errors import DMDError

EXIT_BAD_INPUT = 2


def parser(description: str, config: bool = True, out: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except (DMDError, ModelFolderError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename:
            msg = f"file not found: {e.filename}" if isinstance(e, FileNotFoundError) else f"{e.strerror}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
