"""Pairs as a distributed, resumable job (engine/pairs_job.py), with 2 CPU processes on gloo started by the
`deepspeed` launcher: the same bytes as one process, a killed job continued (only what is missing or damaged
is made again), and a 2-process training run whose pair making outlasts the collective timeout."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_config_cli import run
from test_zero3 import launch_script as launch

SHARDS = 7  # 40 pairs in shards of 6 (the last holds 4), made in batches of 4 (each shard: 4 + 2)


@pytest.fixture(scope="module", autouse=True)
def needs_deepspeed():
    return pytest.importorskip("deepspeed")


def _cfg(tmp_path, teacher_dir, pairs_dir, name="cfg", zero=False, data=None, **train):
    cfg = {"name": "pairs", "model": {"kind": "unet", "teacher": str(teacher_dir)},
           "data": {"num_pairs": 40, "pair_steps": 3, "shard_size": 6, "pair_batch_size": 4,
                    "pairs_dir": str(pairs_dir), **(data or {})},
           "train": {"batch_size": 8, "reg_batch_size": 4, "max_steps": 2, "lpips_backbone": "random",
                     "log_every": 1, "sample_every": 0, "save_every": 0, "threads": 1, **train},
           "eval": {"num_samples": 8}, "deepspeed": {"enabled": zero}}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _inodes(folder: Path) -> dict:
    return {p.name: p.stat().st_ino for p in folder.iterdir()}


def _shard_files(k: int) -> list[str]:
    return [f"shard_{k:05d}.{part}.npy" for part in ("z", "y", "label")] + [f"shard_{k:05d}.json"]


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, tmp_path_factory):
    """The pairs one process makes (python engine/make_pairs.py), uninterrupted."""
    tmp = tmp_path_factory.mktemp("pairs_one")
    r = run("engine/make_pairs.py", "--config", _cfg(tmp, tiny_teacher_dir, tmp / "pairs"), "--out", tmp / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    files = _files(tmp / "pairs")
    assert len(files) == 4 * SHARDS + 1 and not [n for n in files if n.startswith(".")]
    return files


def test_two_processes_make_the_same_bytes_as_one(reference, tiny_teacher_dir, tmp_path):
    r = launch("engine/make_pairs.py", "--config", _cfg(tmp_path, tiny_teacher_dir, tmp_path / "pairs"),
               "--out", tmp_path / "run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # round-robin: both ranks worked, on equal shares
    assert "rank 0 made 4 shard(s): 0, 2, 4, 6" in r.stdout and "rank 1 made 3 shard(s): 1, 3, 5" in r.stdout, r.stdout
    assert r.stdout.count("40 pairs in") == 1  # rank 0 alone reports (and verified the folder)
    got = _files(tmp_path / "pairs")
    assert got.keys() == reference.keys()
    assert [n for n in got if got[n] != reference[n]] == []  # every shard, record and the manifest, byte for byte


def test_killed_job_with_damaged_and_foreign_shards_is_continued_by_two_processes(reference, tiny_teacher_dir,
                                                                                  tmp_path):
    pairs = tmp_path / "pairs"
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs)
    # 1. one process, SIGKILLed while writing its 5th shard (parts on disk, no record): shards 0-3 complete
    r = subprocess.run([sys.executable, "engine/make_pairs.py", "--config", str(cfg), "--out", str(tmp_path / "run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DMD_TEST_KILL_IN_SHARD": "5"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (pairs / "manifest.json").exists()
    assert (pairs / "shard_00004.y.npy").is_file() and not (pairs / "shard_00004.json").exists()
    # 2. what a crash or a careless copy may leave: a flipped byte in shard 1, another config's shard 2
    y1 = pairs / "shard_00001.y.npy"
    raw = bytearray(y1.read_bytes())
    raw[-5] ^= 0x40
    y1.write_bytes(bytes(raw))
    other = tmp_path / "other"
    r = run("engine/make_pairs.py", "--config", _cfg(tmp_path, tiny_teacher_dir, other, "other", data={"pair_steps": 4}),
            "--out", tmp_path / "run_other")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in _shard_files(2):
        (pairs / name).write_bytes((other / name).read_bytes())
    before = _inodes(pairs)
    # 3. two processes continue the job
    r = launch("engine/make_pairs.py", "--config", cfg, "--out", tmp_path / "run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout
    assert "2 of 7 shards complete, 5 to make on 2 process(es)" in out, out
    assert "shard 1 is made again: shard_00001.y.npy does not match the record's checksum" in out, out
    assert "shard 2 is made again: made for another teacher or config" in out, out
    assert "shard 4 is made again: killed before it was complete" in out, out
    assert "rank 0 made 3 shard(s): 1, 4, 6" in out and "rank 1 made 2 shard(s): 2, 5" in out, out
    after = _inodes(pairs)
    for k in range(SHARDS):  # the intact shards were kept as they were (same files), the others written anew
        for name in _shard_files(k):
            assert (after[name] == before.get(name)) == (k in (0, 3)), (k, name)
    got = _files(pairs)
    assert got.keys() == reference.keys() and [n for n in got if got[n] != reference[n]] == []


SLOW_TRAIN = """\
import datetime, runpy, sys, time
sys.path[:0] = [{root!r}, {root!r} + "/engine"]
import torch.distributed as dist
import models.samplers

init = dist.init_process_group
# DeepSpeed's own DEEPSPEED_TIMEOUT counts whole minutes: the test sets the process group's timeout in seconds
dist.init_process_group = lambda *a, **k: init(*a, **{{**k, "timeout": datetime.timedelta(seconds={timeout})}})
sample = models.samplers.sample
models.samplers.sample = lambda *a, **k: (time.sleep({sleep}), sample(*a, **k))[1]  # a slow teacher
runpy.run_path({root!r} + "/engine/train.py", run_name="__main__")
"""


def test_two_process_training_makes_pairs_longer_than_the_collective_timeout(tiny_teacher_dir, tmp_path):
    """4 shards of one teacher batch, each 8 s: 32 s of pair making on one process, beyond the 15 s timeout of
    every collective. Each rank makes 2 shards, so the ranks meet at the barrier within moments of each other."""
    timeout, sleep = 15, 8
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN.format(root=str(ROOT), timeout=timeout, sleep=sleep))
    cfg = _cfg(tmp_path, tiny_teacher_dir, tmp_path / "pairs", zero=True,
               data={"num_pairs": 24, "shard_size": 6, "pair_batch_size": 6})
    r = launch(script, "--config", cfg, "--out", tmp_path / "run", "--quiet", timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "rank 0 made 2 shard(s): 0, 2" in r.stdout and "rank 1 made 2 shard(s): 1, 3" in r.stdout, r.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert 4 * sleep > timeout and summary["pairs_s"] >= 2 * sleep  # the job was longer than the timeout


FAILING_PAIRS = """\
import os, runpy, sys
sys.path[:0] = [{root!r}, {root!r} + "/engine"]
import models.samplers
sample = models.samplers.sample

def failing(*a, **k):  # rank 1's teacher fails (out of memory, say) on its first batch
    if os.environ.get("RANK") == "1":
        raise RuntimeError("CUDA out of memory (planted)")
    return sample(*a, **k)
models.samplers.sample = failing
runpy.run_path({root!r} + "/engine/make_pairs.py", run_name="__main__")
"""


def test_a_failing_rank_stops_every_rank_with_its_error_not_a_timeout(tiny_teacher_dir, tmp_path):
    """Rank 1 fails on its share: rank 0, done with its own, gets rank 1's error at once instead of waiting at
    a collective until the timeout; both exit with one line, no manifest is written and the lock is freed."""
    script = tmp_path / "failing_pairs.py"
    script.write_text(FAILING_PAIRS.format(root=str(ROOT)))
    folder = tmp_path / "pairs"
    r = launch(script, "--config", _cfg(tmp_path, tiny_teacher_dir, folder), "--out", tmp_path / "run", timeout=180)
    assert r.returncode != 0
    line = "pairs: rank 1 failed (RuntimeError: CUDA out of memory (planted))"
    assert r.stderr.count(line) >= 2, r.stderr[-3000:]  # reported by both ranks
    assert not (folder / "manifest.json").exists() and not (folder / ".pairs.lock").exists()
    assert (folder / "shard_00000.json").is_file()  # rank 0's own shards stay for the rerun
