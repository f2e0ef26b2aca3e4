"""What a hostile or careless user tried, replayed so it stays fixed: bad values are one line before any work, a
run folder is written only by its own run, and SIGTERM / SIGUSR1 stop a run with a checkpoint to resume from."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_config_cli import run
from test_end_to_end import _cfg

TOY = ["--config", "configs/toy2d.json", "--quiet", "--set", "train.fake_warmup_steps=0",
       "--set", "train.reg_weight=0", "--set", "eval.num_samples=50", "--set", "train.log_every=1"]


# --- every value checked at load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size must be > 0"),
    ("train.batch_size=-4", "train.batch_size must be > 0"),
    ("train.lr_generator=NaN", "train.lr_generator must be finite and > 0"),
    ("train.lr_generator=-1e-4", "train.lr_generator must be finite and > 0"),
    ("train.lr_fake=Infinity", "train.lr_fake must be finite and > 0"),
    ("train.betas=[1.5]", "train.betas must be two numbers in [0, 1)"),
    ("train.betas=[0.9, 1.0]", "train.betas must be two numbers in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay must be finite and >= 0"),
    ("train.reg_weight=NaN", "train.reg_weight must be finite and >= 0"),
    ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1)"),
    ("data.pair_sampler=\"bogus\"", "data.pair_sampler must be one of heun, ddim"),
    ("data.loader=\"torchdata\"", "data.loader must be one of auto, numpy, dali"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be > 0"),
    ("train.max_consecutive_skips=-1", "train.max_consecutive_skips must be > 0"),
    ("train.min_t_frac=0.99", "min_t_frac < max_t_frac"),
    ("train.kernels=\"cuda\"", "train.kernels must be one of auto, eager, triton"),
    ("train.device=\"tpu\"", "train.device must be auto, cpu, cuda or cuda:N"),
    ("deepspeed.keep_checkpoints=0", "deepspeed.keep_checkpoints must be > 0"),
    ("eval.num_samples=0", "eval.num_samples must be > 0"),
])
def test_bad_values_are_refused_at_load(override, message):
    from engine.config import ConfigError, DMDConfig, load
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load(ROOT / "configs" / "digits.json", DMDConfig, [override])


def test_every_rule_refuses_something_and_accepts_the_default():
    """Each key in engine/config.py's RULES rejects at least one value of its own type, and its default passes."""
    import dataclasses
    from engine.config import RULES, DMDConfig, DeepSpeedSection, ConfigError, check_values
    sections = {type(getattr(DMDConfig(), f.name)).__name__: getattr(DMDConfig(), f.name)
                for f in dataclasses.fields(DMDConfig) if dataclasses.is_dataclass(getattr(DMDConfig(), f.name))}
    assert set(RULES) == set(sections), set(RULES) ^ set(sections)
    bad = {int: [-1, 0, 2], float: [float("nan"), float("inf"), -1.0, 2.0], str: ["bogus"], list: [[1.5], []]}
    for name, rules in RULES.items():
        check_values(sections[name], name)  # the defaults are valid
        for key in rules:
            if key == "section":
                continue
            default = getattr(sections[name], key)
            refused = 0
            for v in bad[type(default)]:
                try:
                    check_values(dataclasses.replace(sections[name], **{key: v}), name)
                except ConfigError:
                    refused += 1
            assert refused, f"{name}.{key} accepts every value tried"
    assert DeepSpeedSection().zero_stage == 3


@pytest.mark.parametrize("args, message", [
    (["--set", "train.batch_size=0"], "train.batch_size must be > 0"),
    (["--max-steps", "-3"], "--max-steps must be >= 0"),
    (["--set", "train.gan_real_dequantize=0.1"], "train.gan_real_dequantize > 0 needs the GAN"),
])
def test_bad_values_are_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "run"
    r = run("engine/train.py", *TOY, "--out", str(out), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


# --- a run folder is written only by its own run -----------------------------------------------------------------
def test_a_fresh_run_never_writes_into_a_run_or_a_foreign_folder(tmp_path):
    out = tmp_path / "run"
    assert run("engine/train.py", *TOY, "--out", str(out), "--max-steps", "3").returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = run("engine/train.py", *TOY, "--out", str(out), "--max-steps", "2")
    assert r.returncode == 2 and "is not empty" in r.stderr and "--resume" in r.stderr, r.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own file")
    r = run("engine/train.py", *TOY, "--out", str(mine), "--max-steps", "1")
    assert r.returncode == 2 and "config.json" in r.stderr and (mine / "config.json").read_text() == "my own file"

    r = run("engine/train.py", *TOY, "--out", "/sys/dmd_engine_test_out", "--max-steps", "1")
    assert r.returncode == 2 and "cannot be created" in r.stderr and "Traceback" not in r.stderr, r.stderr

    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run("engine/train.py", *TOY, "--out", str(afile), "--max-steps", "1")
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and afile.read_text() == "x"


def test_overwrite_replaces_a_run_as_a_whole(tmp_path):
    out = tmp_path / "run"
    assert run("engine/train.py", *TOY, "--out", str(out), "--max-steps", "4").returncode == 0
    r = run("engine/train.py", *TOY, "--out", str(out), "--max-steps", "2", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the old run's lines are gone, not mixed in
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_resume_accepts_only_run_length_and_logging_changes(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, tiny_teacher_dir, sample_every=0, reg_weight=0.0)
    assert run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet", "--max-steps", "2").returncode == 0
    saved = (out / "config.json").read_text()
    r = run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet", "--resume",
            "--set", "train.lr_generator=0.5", "--set", "train.seed=7")
    assert r.returncode == 2 and "train.lr_generator" in r.stderr and "train.seed" in r.stderr, r.stderr[-2000:]
    assert "older engine" not in r.stderr
    assert (out / "config.json").read_text() == saved
    older = json.loads(saved)  # a run written before train.fake_t_range existed
    del older["train"]["fake_t_range"]
    (out / "config.json").write_text(json.dumps(older))
    r = run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet", "--resume")
    assert r.returncode == 2 and "has no train.fake_t_range" in r.stderr and "older engine" in r.stderr, r.stderr
    (out / "config.json").write_text(saved)
    r = run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet", "--resume",
            "--set", "train.max_steps=3", "--set", "train.log_every=3")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert lines[2]["resumed_from"] == 2 and lines[2]["config_changes"]["train.max_steps"] == [4, 3]
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 3
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_run_older_than_a_key_added_at_its_old_behaviour_still_resumes():
    """runfolder.ADDED_AT_DEFAULT: a key a run's config.json lacks counts at its default when that default is what
    the older engine did; any other value, or a key not listed, is still refused."""
    from engine.runfolder import config_changes
    new = {"train": {"lr_fake": 1e-4, "gan_real_dequantize": 0.0, "fake_t_range": "dm"}}
    old = {"train": {"lr_fake": 1e-4, "fake_t_range": "dm"}}
    assert config_changes(old, new) == ({}, [])
    other = {"train": {**new["train"], "gan_real_dequantize": 0.1}}
    assert config_changes(old, other)[1] == ["train.gan_real_dequantize"]
    assert config_changes({"train": {"lr_fake": 1e-4}}, new)[1] == ["train.fake_t_range"]


# --- bad inputs: one line and exit 2 ---------------------------------------------------------------------------
def _broken_teacher(tmp_path, tiny_teacher_dir, how):
    import shutil
    t = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, t)
    weights = t / "unet" / "diffusion_pytorch_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif how == "header":
        raw = bytearray(weights.read_bytes())
        raw[8:40] = b"{" * 32  # the JSON header right after its 8-byte length
        weights.write_bytes(bytes(raw))
    else:
        (t / "unet" / "config.json").write_text("{not json")
    return t


@pytest.mark.parametrize("how", ["truncated", "header", "config"])
def test_a_corrupt_teacher_is_one_line(tmp_path, tiny_teacher_dir, how):
    teacher = _broken_teacher(tmp_path, tiny_teacher_dir, how)
    cfg = _cfg(tmp_path, teacher, reg_weight=0.0)
    r = run("engine/train.py", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(teacher) in r.stderr


def test_a_resolution_the_teacher_cannot_make_is_refused(tmp_path, tiny_teacher_dir):
    cfg = _cfg(tmp_path, tiny_teacher_dir, reg_weight=0.0)
    r = run("engine/train.py", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet",
            "--set", "data.resolution=16")
    assert r.returncode == 2 and "data.resolution = 16 but the teacher" in r.stderr and "8x8" in r.stderr, r.stderr


def test_infer_and_evaluate_bad_arguments_are_one_line(tmp_path):
    import numpy as np
    run_dir = tmp_path / "toy"
    assert run("engine/train.py", *TOY, "--out", str(run_dir), "--max-steps", "1").returncode == 0
    r = run("engine/infer.py", "--checkpoint", str(run_dir), "--batch-size", "0", "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 2 and "--batch-size must be >= 1" in r.stderr, r.stderr
    (tmp_path / "notzip.npz").write_text("hello")
    np.savez(tmp_path / "objects.npz", images=np.array([{"a": 1}], dtype=object), labels=np.zeros(1))
    np.savez(tmp_path / "tiny.npz", images=np.zeros((4, 3, 3, 1), np.uint8), labels=np.zeros(4))
    for name, message in (("notzip.npz", "not an .npz of plain arrays"), ("objects.npz", "not an .npz of plain arrays"),
                          ("tiny.npz", "scores class-conditional digits")):
        r = run("examples/digits/evaluate.py", str(tmp_path / name))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr[-2000:])


def test_make_pairs_keeps_complete_pairs_and_refuses_to_replace_others(tmp_path, tiny_teacher_dir):
    cfg, out = _cfg(tmp_path, tiny_teacher_dir), tmp_path / "run"
    assert run("engine/make_pairs.py", "--config", str(cfg), "--out", str(out)).returncode == 0
    files = {p: p.read_bytes() for p in sorted((out / "pairs").iterdir())}
    r = run("engine/make_pairs.py", "--config", str(cfg), "--out", str(out))
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr[-2000:]
    r = run("engine/make_pairs.py", "--config", str(cfg), "--out", str(out), "--set", "data.pair_steps=4")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "'steps'" in r.stderr, r.stderr[-2000:]
    assert {p: p.read_bytes() for p in sorted((out / "pairs").iterdir())} == files  # nothing lost
    r = run("engine/make_pairs.py", "--config", str(cfg), "--out", str(out), "--set", "data.pair_steps=4", "--overwrite")
    assert r.returncode == 0 and json.loads((out / "pairs" / "manifest.json").read_text())["steps"] == 4


# --- pairs and checkpoints are verified before use ----------------------------------------------------------------
def _toy_pairs(tmp_path):
    from engine.config import DataSection
    from engine.pairs import write_pairs
    from models.toy import GaussianMixtureDenoiser
    dc = DataSection(num_pairs=20, pair_steps=3, shard_size=10, pair_batch_size=10)
    return write_pairs(tmp_path / "pairs", GaussianMixtureDenoiser(), "h", dc, progress=False)


@pytest.mark.parametrize("content", ["nan", "random"])
def test_a_shard_changed_in_place_is_refused_naming_it(tmp_path, content):
    """Same size, other bytes (NaN pairs, or noise over the data): the manifest's checksum tells."""
    import numpy as np
    from engine.errors import PairsError
    from engine.pairs import PairReader
    folder = _toy_pairs(tmp_path)
    shard = folder / "shard_00001.y.npy"
    arr = np.load(shard)
    if content == "nan":
        np.save(shard, np.full_like(arr, np.nan))
    else:
        raw = bytearray(shard.read_bytes())
        raw[-40:] = np.random.default_rng(0).integers(0, 256, 40, dtype=np.uint8).tobytes()
        shard.write_bytes(bytes(raw))
    with pytest.raises(PairsError, match="shard_00001.y.npy' does not match the manifest's checksum"):
        PairReader(folder)


def test_a_manifest_without_shards_is_one_line(tmp_path):
    from engine.errors import PairsError
    from engine.pairs import PairReader
    folder = _toy_pairs(tmp_path)
    man = json.loads((folder / "manifest.json").read_text())
    del man["shards"]
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PairsError, match="not a pairs manifest"):
        PairReader(folder)


def test_a_damaged_checkpoint_is_refused_in_one_line_and_a_pickle_payload_never_runs(tmp_path):
    import torch
    out = tmp_path / "run"
    assert run("engine/train.py", *TOY, "--out", str(out), "--max-steps", "2").returncode == 0
    state = out / "checkpoint" / "state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])  # truncated
    r = run("engine/train.py", *TOY, "--out", str(out), "--resume", "--max-steps", "3")
    assert r.returncode == 2 and "is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"models": Payload()}, state)
    (out / "checkpoint" / "checksums.json").unlink()  # as if the attacker rewrote the record too
    r = run("engine/train.py", *TOY, "--out", str(out), "--resume", "--max-steps", "3")
    assert r.returncode == 2 and "cannot be read as tensors" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()


# --- preemption ------------------------------------------------------------------------------------------------
def _wait_for_step(log, proc, step: int, timeout: float = 300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
        if log.is_file() and any(json.loads(x).get("step", 0) >= step for x in log.read_text().splitlines() if x):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_with_a_checkpoint_and_resume_continues(tmp_path, sig):
    import torch
    out = tmp_path / "run"
    cmd = [sys.executable, "engine/train.py", *TOY, "--out", str(out), "--max-steps", "100000"]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        _wait_for_step(out / "log.jsonl", p, 3)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 75, stderr[-2000:]
    assert f"stopped by {sig.name}" in stdout and "checkpoint written" in stdout
    step = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert step >= 3 and not (out / "samples.npz").exists()
    r = run("engine/train.py", *TOY, "--out", str(out), "--resume", "--max-steps", str(step + 2))
    assert r.returncode == 0 and f"resumed at step {step}" in r.stdout, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2
