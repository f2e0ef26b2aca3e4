"""Smoke runs of the real entry points, on a tiny random teacher and on the toy."""
import json

import numpy as np
import pytest
import torch

from test_config_cli import run


def _cfg(tmp_path, teacher_dir, **train):
    cfg = {"name": "smoke", "model": {"kind": "unet", "teacher": str(teacher_dir)},
           "data": {"num_pairs": 24, "pair_steps": 3, "shard_size": 10, "pair_batch_size": 8},
           "train": {"batch_size": 8, "reg_batch_size": 4, "max_steps": 4, "lpips_backbone": "random",
                     "log_every": 1, "sample_every": 2, "save_every": 2, **train},
           "eval": {"num_samples": 20}}
    p = tmp_path / "smoke.json"
    p.write_text(json.dumps(cfg))
    return p


def test_train_writes_checkpoint_generator_and_samples(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_teacher_dir)), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("config.json", "log.jsonl", "pairs/manifest.json", "checkpoint/state.pt", "generator/unet/config.json",
              "samples.npz", "grid.png", "summary.json", "losses.png", "grid_step000002.png"):
        assert (out / f).exists(), f
    logs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs] == [1, 2, 3, 4]
    assert all(k in logs[-1] for k in ("loss_dm", "loss_reg", "loss_fake", "grad_norm_g"))
    with np.load(out / "samples.npz") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (20, 8, 8, 1) and f["labels"].shape == (20,)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 4

    # the generator really trained: its weights differ from the teacher's
    from models import Denoiser, OneStepGenerator
    g = OneStepGenerator.from_pretrained(out / "generator")
    t = Denoiser.from_pretrained(tiny_teacher_dir)
    diff = sum((a - b).abs().sum().item() for a, b in zip(g.denoiser.parameters(), t.parameters()))
    assert diff > 0

    # sampling from the run (one step) and from its teacher, then evaluation of the samples
    r = run("engine/infer.py", "--checkpoint", str(out), "--num", "30", "--out", str(tmp_path / "s.npz"),
            "--grid", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("engine/infer.py", "--checkpoint", str(out), "--teacher", "--sampler", "ddim", "--steps", "3",
            "--num", "12", "--out", str(tmp_path / "t.npz"))
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / "t.npz") as f:
        assert f["images"].shape == (12, 8, 8, 1)
    r = run("examples/digits/evaluate.py", str(tmp_path / "s.npz"), "--subsets", "2", "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["fd"] > 0 and 0 <= m["accuracy"] <= 1 and m["num_samples"] == 30

    # resume continues from the checkpoint's step
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_teacher_dir)), "--out", str(out), "--quiet",
            "--resume", "--max-steps", "6")
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 6

    # a kill between the two renames of a save leaves only .checkpoint.old: resume still finds it
    (out / "checkpoint").rename(out / ".checkpoint.old")
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_teacher_dir)), "--out", str(out), "--quiet",
            "--resume", "--max-steps", "7")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at step 6" in r.stdout
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 7


def test_corrupt_pairs_stop_training_with_the_file_named(tmp_path, tiny_teacher_dir):
    cfg = _cfg(tmp_path, tiny_teacher_dir)
    out = tmp_path / "run"
    assert run("engine/make_pairs.py", "--config", str(cfg), "--out", str(out)).returncode == 0
    f = out / "pairs" / "shard_00001.z.npy"
    f.write_bytes(f.read_bytes()[:100])
    r = run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet")
    assert r.returncode == 2 and "shard_00001.z.npy" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_toy_run_writes_samples(tmp_path):
    out = tmp_path / "toy"
    r = run("engine/train.py", "--config", "configs/toy2d.json", "--out", str(out), "--quiet", "--max-steps", "20",
            "--set", "train.fake_warmup_steps=5", "--set", "data.num_pairs=100", "--set", "eval.num_samples=50",
            "--set", "train.reg_batch_size=50")  # the config's 256 needs at least 256 pairs
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (50, 2) and np.isfinite(f["samples"]).all()


def test_evaluate_rejects_bad_npz(tmp_path):
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((3, 8, 8, 1), np.uint8))
    r = run("examples/digits/evaluate.py", str(tmp_path / "bad.npz"))
    assert r.returncode == 2 and "expected arrays 'images'" in r.stderr


def test_evaluate_refuses_text_run_samples_in_one_line(tmp_path):
    """A text run's samples (RGB, any side) are not digits: one line saying what the evaluator scores."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t2i.npz", images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(6) % 3)
    r = run("examples/digits/evaluate.py", str(tmp_path / "t2i.npz"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "scores class-conditional digits" in r.stderr


def test_a_dropped_extra_fake_update_does_not_mark_the_applied_generator_update_skipped(tiny_teacher_dir):
    """Two-time-scale: the generator update and the first fake update are applied; a non-finite second fake
    update is dropped. The log must say exactly that (skipped 0, skipped_fake 1), not 'step skipped'."""
    from engine.config import DMDConfig, parse
    from engine.plain import PlainBackend
    from engine.trainer import DMDTrainer
    cfg = parse(DMDConfig, {"model": {"kind": "unet", "teacher": str(tiny_teacher_dir)},
                            "train": {"batch_size": 4, "reg_weight": 0.0, "fake_updates_per_generator": 3}})
    tr = DMDTrainer(PlainBackend(cfg), cfg.train, seed=0)
    tr.train_step()  # a healthy step first: the fake score now differs from the teacher, so G's gradient is not 0
    fake_step, calls = tr.fake_step, []

    def poisoned(x=None, cond=None):  # the second fake update of the step (the first extra one) goes NaN
        logs = fake_step(x, cond)
        calls.append(1)
        return {**logs, "loss_fake": float("nan")} if len(calls) == 2 else logs
    tr.fake_step = poisoned
    before = [p.detach().clone() for p in tr.m.generator.parameters()]
    logs = tr.train_step()
    assert len(calls) == 2  # the third update is not tried after a dropped one
    assert logs["skipped"] == 0.0 and logs["skipped_fake"] == 1.0 and tr.skipped_total == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.m.generator.parameters()))  # it was applied


def test_sampling_generator_is_in_eval_mode_then_back_to_training(tiny_teacher_dir):
    """Sample grids and exports must not see dropout (nor draw from the training RNG), and training resumes
    in train mode afterwards."""
    from engine.plain import PlainBackend
    from engine.config import DMDConfig, parse
    for ema in (0.0, 0.9):
        m = PlainBackend(parse(DMDConfig, {"model": {"kind": "unet", "teacher": str(tiny_teacher_dir)},
                                        "train": {"batch_size": 4, "ema_decay": ema}}))
        assert m.generator.training
        with m.sampling() as gen:
            assert gen is (m.ema if ema else m.generator) and not gen.training
        assert m.generator.training and (m.ema is None or not m.ema.training)


def test_device_choice(monkeypatch):
    """train.device: auto follows torch.cuda.is_available; a CUDA choice without CUDA is one clear error."""
    from engine.plain import resolve_device
    from engine.errors import DMDError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DMDError, match="train.device is 'cuda' but torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(DMDError, match="train.device must be auto, cuda, cuda:N or cpu, got 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DMDError, match="train.device is 'cuda:2' but torch sees 2 CUDA device"):
        resolve_device("cuda:2")


def test_plain_run_reports_its_device(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_teacher_dir, sample_every=0)), "--out", str(out),
            "--quiet", "--max-steps", "2", "--set", "train.device=cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_plain_run_uses_the_gpu_by_default(tmp_path, tiny_teacher_dir):
    """One process on a GPU machine trains there (pairs, steps with the Triton kernels, samples, export)."""
    out = tmp_path / "run"
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_teacher_dir)), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["device"] == "cuda" and s["steps"] == 4
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (20, 8, 8, 1)
    counts = json.loads((out / "partition.json").read_text())[0]  # "auto" precision on a GPU: bf16 teacher,
    assert counts["teacher"][2] == "bfloat16" and counts["generator"][2] == "float32"  # fp32 trained weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_plain_run_on_the_gpu_resumes(tmp_path, tiny_teacher_dir):
    """The checkpoint's RNG states must come back as CPU tensors even when the models live on the GPU."""
    out, cfg = tmp_path / "run", _cfg(tmp_path, tiny_teacher_dir, sample_every=0)
    r = run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet", "--max-steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet", "--resume")
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr[-2000:]
