"""Tagged checkpoint folders: OUT/checkpoints/step_NNNNNN/ and OUT/checkpoints/latest naming the newest complete one
(the ZeRO-3 backend's layout, engine/zero.py).

`publish` runs once every process has written its part of a tag: `latest` is replaced by rename, then all but
the newest `keep` complete tags are removed, with the leftovers of killed saves. `intact_tag` picks what a
resume loads: the newest tag at or below `latest` whose files match the checksums written with them.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from .errors import DMDError
from .files import atomic_write_text, damaged

TAG = re.compile(r"^step_(\d{6,})$")


def tags(root: Path) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), d.name) for d in root.iterdir() if d.is_dir() and (m := TAG.match(d.name)))


def latest_tag(root: Path) -> str | None:
    f = root / "latest"
    return f.read_text().strip() if f.is_file() else None


def publish(root: Path, step: int, keep: int):
    atomic_write_text(root / "latest", f"step_{step:06d}\n")
    done = [t for s, t in tags(root) if s <= step]
    for s, t in tags(root):
        if s > step or t in done[:-max(keep, 1)]:  # leftovers of killed saves, and old tags
            shutil.rmtree(root / t, ignore_errors=True)


def intact_tag(root: Path, warn: bool = True) -> str:
    """The newest complete tag whose files match their checksums; each damaged one is skipped with a warning
    naming it. Every process reads the same files, so all reach the same tag."""
    tag = latest_tag(root) if root.is_dir() else None
    if tag is None or not TAG.match(tag):
        raise DMDError(f"--resume: no complete checkpoint in {root} (no valid 'latest' file)")
    newest = int(TAG.match(tag).group(1))
    for _, t in reversed([x for x in tags(root) if x[0] <= newest]):
        problem = damaged(root / t, "checksums_rank*.json")
        if problem is None:
            return t
        if warn:
            print(f"warning: checkpoint {root / t} skipped: {problem}", file=sys.stderr, flush=True)
    raise DMDError(f"--resume: no intact checkpoint in {root} (see the warnings above)")
