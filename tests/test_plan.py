"""train.py --dry-run (engine/plan.py): per-rank memory from the config files alone, on the meta device."""
import builtins
import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from engine import plan as P
from engine.config import DMDConfig, load
from engine.errors import DMDError
from models.sd15 import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, sd15_schedule, sd15_unet

SD15_UNET_PARAMS = 859_520_964


def _no_weights(mp):
    """Any attempt to read weights fails the test."""
    import safetensors
    import safetensors.torch

    def refuse(*a, **k):
        raise AssertionError(f"a weight file was opened: {a[:1]}")
    for owner, name in ((safetensors.torch, "load_file"), (safetensors, "safe_open"), (torch, "load")):
        mp.setattr(owner, name, refuse)


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    """SD1.5's layout with its real configs and nothing else: config.json files and model_index.json."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig
    d = tmp_path_factory.mktemp("sd15") / "sd15"
    with torch.device("meta"):
        UNet2DConditionModel(**SD15_UNET_CONFIG).save_config(d / "unet")
        AutoencoderKL(**SD15_VAE_CONFIG, scaling_factor=0.18215).save_config(d / "vae")
    CLIPTextConfig(**SD15_TEXT_CONFIG).save_pretrained(d / "text_encoder")
    (d / "scheduler").mkdir()
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", **sd15_schedule().params, "prediction_type": "epsilon"}))
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert all(p.suffix == ".json" for p in d.rglob("*") if p.is_file())
    return d


@contextlib.contextmanager
def _setting(nets, **values):
    """Config values changed for the block (section__key=value), restored after."""
    keys = {k: k.split("__") for k in values}
    old = {k: getattr(getattr(nets.cfg, s), key) for k, (s, key) in keys.items()}
    for k, (s, key) in keys.items():
        setattr(getattr(nets.cfg, s), key, values[k])
    try:
        yield
    finally:
        for k, (s, key) in keys.items():
            setattr(getattr(nets.cfg, s), key, old[k])


def _persistent(nets) -> int:
    """Elements of the teacher's parameters small enough to stay whole on every rank."""
    return sum(x.numel() for x in nets.teacher.parameters() if x.numel() <= nets.cfg.deepspeed.persistence_threshold)


def _sd_cfg(folder, *overrides):
    return load(ROOT / "configs" / "sd15_zero3.json", DMDConfig, [f"model.teacher={folder}", *overrides])


@pytest.fixture(scope="module")
def sd(sd15_folder):
    with pytest.MonkeyPatch.context() as mp:
        _no_weights(mp)
        nets = P.Nets(_sd_cfg(sd15_folder))
        return nets, P.activations(nets)


def test_sd15_real_architecture_on_the_meta_device(sd):
    nets, _ = sd
    with torch.device("meta"):
        assert sum(p.numel() for p in sd15_unet()[0].parameters()) == SD15_UNET_PARAMS  # what sd15_unet() builds
    par = nets.parameters
    assert par["teacher"] == par["generator"] == par["fake"] == SD15_UNET_PARAMS
    assert par["text_encoder"] == 123_060_480 and par["autoencoder"] == 83_653_863  # CLIP ViT-L/14 text, SD VAE
    assert 14e6 < par["lpips"] < 15e6  # VGG16's features (lpips_net vgg) + LPIPS's linear heads
    assert all(p.device.type == "meta" for m in (nets.teacher, nets.generator, nets.fake) for p in m.parameters())
    assert nets.teacher.sample_shape == (4, 64, 64)


@pytest.mark.parametrize("offload", [False, True])
def test_partitioned_states_shrink_as_one_over_n_and_offload_moves_them(sd, offload):
    nets, acts = sd
    on = "cpu" if offload else "gpu"
    with _setting(nets, deepspeed__offload_params=offload, deepspeed__offload_optimizer=offload):
        plans = {n: P.plan(nets, acts, n, 80 * P.GIB, "test") for n in (1, 8, 64)}
    p = SD15_UNET_PARAMS
    for n, pl in plans.items():
        it = pl["per_rank_bytes"]["items"]
        assert pl["processes"] == n
        for key, per_param in (("gradients", 4), ("masters", 4), ("optimizer", 8)):  # fp32 (grad_accum_dtype), fp32, 2 x fp32
            for model in ("generator", "fake"):
                row = it[f"{model}.{key}"]
                assert row[on] == pytest.approx(per_param * p / n, rel=1e-4), (n, model, key)
                assert row["gpu" if offload else "cpu"] == 0
        whole = 0 if offload else 2 * _persistent(nets)
        assert it["teacher.parameters"][on] == pytest.approx(2 * p / n + whole, rel=1e-4)  # bf16 partitions
        assert (it["generator.fp32_grads"]["cpu"] == pytest.approx(4 * p / n, rel=1e-4)) if offload else (
            "generator.fp32_grads" not in it)
        assert it["step"]["gpu"] == (0 if offload else pytest.approx(4 * p / n, rel=1e-4))
    gpu = [plans[n]["per_rank_bytes"]["gpu"] for n in (1, 8, 64)]
    assert gpu[0] > gpu[1] > gpu[2]
    cpu = [plans[n]["per_rank_bytes"]["cpu"] for n in (1, 8, 64)]
    assert (cpu[0] > cpu[1] > cpu[2] > 0) if offload else cpu == [0, 0, 0]


def test_state_totals_are_the_sum_of_their_parts(sd):
    """No double counting: 64 processes, states = 2+4+4+8 bytes/parameter for each trained model (bf16 parameters,
    fp32 gradients, masters, AdamW) + 2 for the teacher."""
    nets, acts = sd
    it = P.plan(nets, acts, 64, 80 * P.GIB, "test")["per_rank_bytes"]["items"]
    states = sum(v["gpu"] for k, v in it.items() if k.split(".")[0] in ("teacher", "generator", "fake")
                 and not k.endswith("reduce_bucket"))
    persistent = 3 * 2 * _persistent(nets)
    assert states == pytest.approx((2 + 2 * 18) * SD15_UNET_PARAMS / 64 + persistent, rel=1e-4)


def test_activations_are_measured_and_checkpointing_cuts_them(sd):
    nets, acts = sd
    g = acts["generator"]
    # flash attention keeps no L x L matrix: SD1.5 at 64x64 latents in bf16 stays near 1.3 GB per sample, where the
    # attention matrices alone (8 heads x 4096^2 x 5 layers) would add over 2.5 GB
    assert 0.8e9 < g["saved_off"] < 2.0e9, g
    assert g["saved_on"] + g["unit"] < g["saved_off"] / 3
    pl = P.plan(nets, acts, 64, 80 * P.GIB, "test")
    a = pl["activations"]
    assert a["checkpointing_on"] < a["checkpointing_off"] and "meta-device" in a["method"]
    assert pl["per_rank_bytes"]["items"]["activations"]["gpu"] == a["checkpointing_on"]  # the config's choice
    # twice the micro-batch, twice the activations
    with _setting(nets, train__micro_batch_size=4):
        four = P.plan(nets, acts, 64, 80 * P.GIB, "test")["activations"]["checkpointing_on"]
    with _setting(nets, train__micro_batch_size=8):
        assert P.plan(nets, acts, 64, 80 * P.GIB, "test")["activations"]["checkpointing_on"] == 2 * four


def test_the_meter_counts_saved_tensors_once_and_emulates_bf16_autocast():
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        x = torch.zeros(1, 4)
    # fp32: Linear 1 saves x (16 B), ReLU its output (32 B), which Linear 2 saves too (counted once)
    assert P._measure(lambda: net(x), [net], None)["saved"] == 16 + 32
    net.to(torch.bfloat16)
    assert P._measure(lambda: net(x), [net], torch.bfloat16)["saved"] == 8 + 16  # x cast to bf16 for the matmul


def test_fits_flips_with_gpu_memory_and_bad_process_counts_are_refused(sd):
    nets, acts = sd
    with _setting(nets, train__micro_batch_size=1):
        big, small = (P.plan(nets, acts, 64, g * P.GIB, "test") for g in (80, 4))
    assert big["fits"] and not small["fits"]
    pr = big["per_rank_bytes"]
    assert pr["gpu_with_reserve"] == pr["gpu"] + P.RESERVE and 4 * P.GIB < pr["gpu_with_reserve"] < 80 * P.GIB
    with pytest.raises(DMDError, match="not divisible by the 3 processes"):
        P.plan(nets, acts, 3, 80 * P.GIB, "test")


def test_digits_config_plans_the_shipped_teacher_without_reading_its_weights(tmp_path, monkeypatch, capsys):
    from models import Denoiser
    whole = sum(p.numel() for p in Denoiser.from_pretrained(ROOT / "assets" / "digits_teacher").parameters())
    cfg = load(ROOT / "configs" / "digits.json", DMDConfig)
    opened = []
    real_open = builtins.open

    def record(f, *a, **k):
        opened.append(str(f))
        return real_open(f, *a, **k)
    _no_weights(monkeypatch)
    for owner in (builtins, io):
        monkeypatch.setattr(owner, "open", record)
    p = P.dry_run(cfg, tmp_path / "plan")
    monkeypatch.undo()
    assert p["parameters"]["teacher"] == p["parameters"]["generator"] == whole and p["engine"] == "plain"
    teacher_files = [f for f in opened if "digits_teacher" in f]
    assert teacher_files and all(f.endswith(".json") for f in teacher_files), teacher_files
    assert not [f for f in opened if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))]
    assert p["fits"] and "verdict: fits" in capsys.readouterr().out
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["processes"] == 1
    with pytest.raises(DMDError, match="need deepspeed.enabled"):
        P.dry_run(cfg, tmp_path / "plan8", processes=8)


def _train(*args):
    return subprocess.run([sys.executable, "engine/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_dry_run_prints_the_table_and_writes_plan_json(sd15_folder, tmp_path):
    r = _train("--config", "configs/sd15_zero3.json", "--out", str(tmp_path / "d"), "--dry-run", "--processes", "8",
               "--gpu-memory", "80", "--set", f"model.teacher={sd15_folder}")
    assert r.returncode == 0, r.stderr
    assert "GPU GiB" in r.stdout and "CPU GiB" in r.stdout and "verdict: " in r.stdout, r.stdout
    assert f"teacher {SD15_UNET_PARAMS:,}" in r.stdout
    p = json.loads((tmp_path / "d" / "plan.json").read_text())
    assert set(p["parameters"]) >= {"teacher", "generator", "fake"} and p["processes"] == 8
    assert isinstance(p["fits"], bool) and {"gpu", "cpu"} <= set(p["per_rank_bytes"])
    assert p["parameters"]["teacher"] == SD15_UNET_PARAMS and p["gpu_memory_bytes"] == 80 * P.GIB
    assert sorted(x.name for x in (tmp_path / "d").iterdir()) == ["plan.json"]  # nothing else written


@pytest.mark.parametrize("args,message", [
    (["--dry-run", "--processes", "0"], "--processes must be >= 1, got 0"),
    (["--dry-run", "--gpu-memory", "-1"], "--gpu-memory must be a positive number"),
    (["--processes", "8"], "--processes and --gpu-memory belong to --dry-run")])
def test_cli_bad_dry_run_arguments_are_one_line(tmp_path, args, message):
    r = _train("--config", "configs/digits.json", "--out", str(tmp_path / "d"), *args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "d").exists()


def test_dmd2_config_plans_the_gan_head_with_the_fake_score(sd15_folder, tmp_path):
    """configs/sd15_dmd2_gan_zero3.json (DMD2's second SD1.5 phase): the head (1280 bottleneck channels -> 256 ->
    256 -> 1) is counted with the fake score, and its extra passes raise the activation peak over no GAN."""
    head = (1280 * 256 * 9 + 256) + 2 * 256 + (256 * 256 * 9 + 256) + 2 * 256 + 257
    plans = {}
    for name, extra in (("gan", []), ("nogan", ["--set", "train.gan_weight_generator=0", "--set",
                                                "train.gan_weight_fake=0"])):
        r = _train("--config", "configs/sd15_dmd2_gan_zero3.json", "--out", str(tmp_path / name), "--dry-run",
                   "--processes", "64", "--gpu-memory", "80", "--set", f"model.teacher={sd15_folder}", *extra)
        assert r.returncode == 0, r.stderr
        plans[name] = json.loads((tmp_path / name / "plan.json").read_text())
    assert plans["gan"]["parameters"]["fake"] == SD15_UNET_PARAMS + head
    assert plans["nogan"]["parameters"]["fake"] == SD15_UNET_PARAMS
    assert plans["gan"]["per_rank_bytes"]["gpu"] > plans["nogan"]["per_rank_bytes"]["gpu"]
