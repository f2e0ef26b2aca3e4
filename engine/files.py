"""File helpers every part of the engine shares: repository-relative paths, atomic writes and folder swaps."""
from __future__ import annotations

import json
import os
import socket
import shutil
from pathlib import Path

from .errors import DMDError

ROOT = Path(__file__).resolve().parents[1]


def resolve_path(p: str) -> Path:
    """A path as given, else relative to the repository root (so shipped assets work from any cwd)."""
    path = Path(p)
    if path.exists() or path.is_absolute():
        return path
    return ROOT / path if (ROOT / path).exists() else path


def ensure_dir(path: str | Path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def atomic_write_text(path: str | Path, text: str):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def swap_in(tmp: Path, final: Path):
    """Replaces folder `final` by the complete folder `tmp`; the old one is deleted only after the rename, so a
    kill at any point leaves a whole folder at `final` or at '.' + name + '.old' (see recover_swapped)."""
    old = final.with_name("." + final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_swapped(final: Path):
    """After a kill between swap_in's two renames, `final` is missing and its old copy is whole: put it back."""
    old = final.with_name("." + final.name + ".old")
    if not final.exists() and old.is_dir():
        old.rename(final)


def file_digest(path: Path) -> dict:
    """Size and sha256 of a file: what a checkpoint records of each of its files, to tell a damaged one."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def write_digests(folder: Path, files, name: str = "checksums.json"):
    """Records file_digest of `files` (paths inside `folder`) in folder/name, written atomically."""
    import json
    folder = Path(folder)
    atomic_write_text(folder / name, json.dumps({Path(f).relative_to(folder).as_posix(): file_digest(f)
                                                 for f in sorted(files)}, indent=1))


def damaged(folder: Path, pattern: str = "checksums*.json") -> str | None:
    """What is wrong with a folder whose files were recorded by write_digests (None: all intact, or no record:
    written before checksums were)."""
    import json
    records = sorted(Path(folder).glob(pattern))
    for rec in records:
        try:
            want = json.loads(rec.read_text())
        except (OSError, ValueError):
            return f"{rec.name} is unreadable"
        for rel, d in want.items():
            f = Path(folder) / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != d["bytes"]:
                return f"{rel} is {f.stat().st_size} bytes, {d['bytes']} were written"
            if file_digest(f)["sha256"] != d["sha256"]:
                return f"{rel} does not match its checksum"
    return None


def load_tensors(path: Path, map_location=None):
    """torch.load that reads tensors only (weights_only=True), a refusal being one line naming the file."""
    import pickle

    import torch
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DMDError(f"{path} cannot be read as tensors (refused, nothing in it was run): {first[:200]}") from None


class FolderLock:
    """One job per folder: a lock file holding the host and pid of the job that writes there (pairs: two runs
    sharing data.pairs_dir must not delete each other's temporary files or manifest). A lock left by a job that
    died on this machine is taken over; one from another machine names its owner."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.held = Path(path), what, False

    def take(self) -> str | None:
        """None when taken, else one line naming the job that holds it."""
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                host, _, pid = self.path.read_text(errors="replace").partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    self.path.unlink(missing_ok=True)  # left behind by a job that died on this machine
                    continue
                return (f"another {self.what} ({host}, pid {pid}) is writing {self.path.parent}; wait for it to "
                        f"finish, or delete {self.path} if that job is gone")
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return None
        return f"could not take {self.path}"

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_manifest(folder: Path, what: str, error, expect: dict | None, hint: str) -> dict:
    """folder/manifest.json (written last by the pairs and real-data jobs), checked against `expect` (key ->
    value); anything else is one line as `error`, naming the file and, for a mismatch, `hint`."""
    mpath = Path(folder) / "manifest.json"
    if not mpath.is_file():
        raise error(f"{what} '{folder}' has no manifest.json (missing or incomplete)")
    try:
        man = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        raise error(f"{mpath}: not valid JSON") from None
    if not isinstance(man, dict):
        raise error(f"{mpath}: not a manifest (no JSON object)")
    for key, want in (expect or {}).items():
        if man.get(key) != want:
            raise error(f"{mpath}: '{key}' is {man.get(key)!r} but this run expects {want!r} ({hint})")
    return man
