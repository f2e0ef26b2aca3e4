"""DMD2 under DeepSpeed ZeRO-3 on 2 CPU processes (gloo): the GAN head partitioned with the fake score, real data
fed per rank, a 2-step generator trained with backward simulation. The run matches one process at the same
global batch, and a run killed with SIGKILL and resumed ends where the uninterrupted one does (on both backends).
model.init_from (DMD2's second phase) starts a run's generator and fake score from another run's exports, across
backends and process counts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_config_cli import run
from test_zero3 import STEPS, _cfg, _generator_weights, _log, _max_diff, launch, needs_deepspeed  # noqa: F401
from test_zero3 import no_shared_memory_left_behind  # noqa: F401 - the module's leak check, here too

DMD2 = dict(reg_weight=0.0, gan_weight_generator=0.05, gan_weight_fake=0.5, generator_timesteps=[999, 499],
            fake_t_range="all", lr_generator=1e-3, lr_fake=1e-3, gan_real_dequantize=0.125)
KEYS = ("loss_dm", "loss_gan_g", "loss_fake", "loss_gan_d", "d_real", "d_fake", "loss_g", "grad_norm_g",
        "grad_norm_f")


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    from engine.real_data import write_pixel_folder
    g = torch.Generator().manual_seed(11)
    x = (torch.rand((40, 1, 8, 8), generator=g) * 2 - 1).clamp(-1, 1)
    return write_pixel_folder(tmp_path_factory.mktemp("real") / "real", x, torch.arange(40) % 10, {"test": True})


def _dmd2_cfg(tmp_path, teacher_dir, real_dir, zero=True):
    cfg = _cfg(tmp_path, teacher_dir, tmp_path / "no_pairs", zero=zero, **DMD2)
    d = json.loads(cfg.read_text())
    d["data"]["real_data"] = str(real_dir)
    cfg.write_text(json.dumps(d))
    return cfg


@pytest.fixture(scope="module")
def dmd2_reference(needs_deepspeed, tiny_teacher_dir, real_dir, tmp_path_factory):  # noqa: F811 - the fixture
    tmp = tmp_path_factory.mktemp("z3dmd2")
    r = launch(_dmd2_cfg(tmp, tiny_teacher_dir, real_dir), tmp / "run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def one_process(tiny_teacher_dir, real_dir, tmp_path_factory):
    """The same DMD2 run on the one-process backend (whose D passes end at the mid block)."""
    tmp = tmp_path_factory.mktemp("dmd2one")
    r = run("engine/train.py", "--config", str(_dmd2_cfg(tmp, tiny_teacher_dir, real_dir, zero=False)),
            "--out", str(tmp / "one"), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "one"


def test_dmd2_matches_one_process(dmd2_reference, one_process):
    one, two = _log(one_process), _log(dmd2_reference)
    assert len(two) == STEPS
    for a, b in zip(one, two):
        for k in KEYS:  # the same tolerance as the DMD parity test: only summation order differs
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (a["step"], k, a[k], b[k])
    assert min(l["loss_gan_d"] for l in two) > 0 and max(l["loss_gan_g"] for l in two) > 0
    assert _max_diff(_generator_weights(one_process), _generator_weights(dmd2_reference)) < 1e-4
    exported = json.loads((dmd2_reference / "generator" / "dmd_model.json").read_text())
    assert exported["timesteps"] == [999, 499]


def test_dmd2_sigkill_then_resume_ends_where_the_uninterrupted_run_does(dmd2_reference, tiny_teacher_dir, real_dir,
                                                                        tmp_path):
    cfg, out = _dmd2_cfg(tmp_path, tiny_teacher_dir, real_dir), tmp_path / "run"
    r = launch(cfg, out, env={"DMD_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    r = launch(cfg, out, "--resume")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # the head, its optimiser state and the real-data position came back: the same weights, the same last losses
    assert _max_diff(_generator_weights(out), _generator_weights(dmd2_reference)) < 1e-6
    last, ref = _log(out)[-1], _log(dmd2_reference)[-1]
    for k in ("loss_gan_d", "d_real", "loss_g"):
        assert last[k] == pytest.approx(ref[k], rel=1e-6), k


def test_one_process_dmd2_sigkill_then_resume_is_bit_identical(one_process, tiny_teacher_dir, real_dir, tmp_path):
    """The one-process checkpoint holds the head, its optimiser state and the real-data position too."""
    cfg, out = _dmd2_cfg(tmp_path, tiny_teacher_dir, real_dir, zero=False), tmp_path / "run"
    cmd = [sys.executable, "engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DMD_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0 and torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    r = run(*cmd[1:], "--resume")
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr[-2000:]
    assert _max_diff(_generator_weights(out), _generator_weights(one_process)) == 0
    last, ref = _log(out)[-1], _log(one_process)[-1]
    assert last["step"] == ref["step"] and all(last[k] == ref[k] for k in KEYS)


# --- model.init_from: a run started from another run's generator and fake score (engine/warmstart.py) ----------
def _fake_weights(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "fake_score" / "unet" / "diffusion_pytorch_model.safetensors"))


def _init_cfg(tmp_path, teacher_dir, real_dir, init_from, zero):
    cfg = _dmd2_cfg(tmp_path, teacher_dir, real_dir, zero=zero)
    d = json.loads(cfg.read_text())
    d["model"]["init_from"] = str(init_from)
    d["train"]["ema_decay"] = 0.9  # the EMA (what is exported) must start from the loaded generator too
    d["train"]["fake_warmup_steps"] = 2  # not run: the loaded fake score already follows its generator
    cfg.write_text(json.dumps(d))
    return cfg


def test_fake_score_export_is_the_trained_fake_score_without_its_head(one_process, tiny_teacher_dir):
    from models import Denoiser, weights_hash
    fake = torch.load(one_process / "checkpoint" / "state.pt", weights_only=True)["models"]["fake"]
    assert {k.split(".")[0] for k in fake} == {"net", "gan_head"}
    assert _max_diff(_fake_weights(one_process), {k[4:]: v for k, v in fake.items() if k.startswith("net.")}) == 0
    meta = json.loads((one_process / "fake_score" / "dmd_model.json").read_text())
    assert meta["teacher_hash"] == weights_hash(tiny_teacher_dir) and meta["step"] == STEPS
    assert json.loads((one_process / "generator" / "dmd_model.json").read_text())["step"] == STEPS
    Denoiser.from_pretrained(one_process / "fake_score")  # a whole denoiser folder


def test_zero3_fake_score_export_consolidates_its_partitions(one_process, dmd2_reference):
    # the same export as one process's (the runs match to summation order)
    assert _max_diff(_fake_weights(dmd2_reference), _fake_weights(one_process)) < 1e-4


def test_init_from_starts_both_networks_from_the_run_on_either_backend(one_process, dmd2_reference, tiny_teacher_dir,
                                                                       real_dir, tmp_path):
    """--max-steps 0 exports what was loaded: 2 ZeRO-3 processes from a one-process run, one process from them."""
    z = tmp_path / "z"
    r = launch(_init_cfg(tmp_path, tiny_teacher_dir, real_dir, one_process, zero=True), z, "--max-steps", "0")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert _max_diff(_generator_weights(z), _generator_weights(one_process)) == 0
    assert _max_diff(_fake_weights(z), _fake_weights(one_process)) == 0
    p = tmp_path / "p"
    r = run("engine/train.py", "--config", str(_init_cfg(tmp_path, tiny_teacher_dir, real_dir, dmd2_reference, False)),
            "--out", str(p), "--quiet", "--max-steps", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _max_diff(_generator_weights(p), _generator_weights(dmd2_reference)) == 0
    assert _max_diff(_fake_weights(p), _fake_weights(dmd2_reference)) == 0


def test_init_from_refuses_a_missing_or_foreign_run_in_one_line(one_process, tiny_teacher_dir, real_dir, tmp_path):
    def refused(init_from, out):
        cfg = _init_cfg(tmp_path, tiny_teacher_dir, real_dir, init_from, zero=False)
        r = run("engine/train.py", "--config", str(cfg), "--out", str(tmp_path / out), "--quiet")
        assert r.returncode == 2 and not (tmp_path / out / "config.json").exists(), r.stderr[-2000:]
        return r.stderr.strip().splitlines()[-1]

    assert "model.init_from: run folder" in refused(tmp_path / "nowhere", "a")
    other = tmp_path / "other"
    shutil.copytree(one_process, other, ignore=shutil.ignore_patterns("checkpoint", "tb"))
    meta = other / "fake_score" / "dmd_model.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "teacher_hash": "0" * 64}))
    assert "was not trained from this teacher" in refused(other, "b")
    gen = other / "generator" / "dmd_model.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "step": STEPS - 2}))
    assert f"generator is from step {STEPS - 2} but fake_score/ from step {STEPS}" in refused(other, "c")
    shutil.rmtree(other / "fake_score")
    assert "fake_score/unet/diffusion_pytorch_model.safetensors is missing" in refused(other, "d")
    assert "names this run's own --out" in refused(tmp_path / "e", "e")


def test_a_resumed_init_from_run_needs_only_its_own_checkpoint(one_process, tiny_teacher_dir, real_dir, tmp_path):
    src, out = tmp_path / "src", tmp_path / "run"
    shutil.copytree(one_process, src, ignore=shutil.ignore_patterns("checkpoint", "tb"))
    cmd = ("engine/train.py", "--config", str(_init_cfg(tmp_path, tiny_teacher_dir, real_dir, src, False)),
           "--out", str(out), "--quiet")
    assert run(*cmd, "--max-steps", "2").returncode == 0
    shutil.rmtree(src)
    r = run(*cmd, "--resume")
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr[-2000:]


def test_init_from_may_differ_on_resume_and_older_runs_without_it_resume():
    from engine.runfolder import config_changes
    old = {"model": {"kind": "unet", "teacher": "t"}, "train": {"lr_fake": 1e-4}}  # written before the key existed
    for new_value in ("", "runs/phase1"):
        changed, bad = config_changes(old, {"model": {**old["model"], "init_from": new_value}, "train": old["train"]})
        assert bad == [] and changed == {"model.init_from": [None, new_value]}
    assert config_changes(old, {**old, "train": {"lr_fake": 1e-5}})[1] == ["train.lr_fake"]  # still refused
