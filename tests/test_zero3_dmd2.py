"""DMD2 under DeepSpeed ZeRO-3 on 2 CPU processes (gloo): the GAN head partitioned with the fake score, real data
fed per rank, a 2-step generator trained with backward simulation. The run matches one process at the same
global batch, and a run killed with SIGKILL and resumed ends where the uninterrupted one does (on both backends)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_config_cli import run
from test_zero3 import STEPS, _cfg, _generator_weights, _log, _max_diff, launch, needs_deepspeed  # noqa: F401
from test_zero3 import no_shared_memory_left_behind  # noqa: F401 - the module's leak check, here too

DMD2 = dict(reg_weight=0.0, gan_weight_generator=0.05, gan_weight_fake=0.5, generator_timesteps=[999, 499],
            fake_t_range="all", lr_generator=1e-3, lr_fake=1e-3)
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
