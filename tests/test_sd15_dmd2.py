"""DMD2 on the latent text-to-image path, end to end on a tiny Stable-Diffusion folder: captioned images encoded
to latents by engine/encode_real.py, a 2-step generator trained with the GAN on those latents, the export
sampled by the stock StableDiffusionPipeline with its multi-step scheduler."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_config_cli import run

PROMPTS = ROOT / "assets" / "prompts" / "demo.txt"
STEPS = [999, 499]


@pytest.fixture(scope="module")
def dmd2_run(tmp_path_factory):
    from PIL import Image

    from models.sd15 import make_sd_folder
    tmp = tmp_path_factory.mktemp("sd_dmd2")
    make_sd_folder(tmp / "sd", "tiny")
    images = tmp / "images"
    images.mkdir()
    y, x = np.mgrid[0:20, 0:24] / 24
    for i in range(8):  # smooth colour fields, one caption each
        a = np.stack([np.sin(3 * x + i), np.cos(4 * y - i), x * y * (i % 3)], -1)
        Image.fromarray(((a - a.min()) / np.ptp(a) * 255).astype(np.uint8)).save(images / f"im{i}.png")
        (images / f"im{i}.txt").write_text(f"a colour field number {i}\n")
    cfg = {"name": "tinysd_dmd2", "model": {"kind": "sd15", "teacher": str(tmp / "sd")},
           "data": {"dataset": "prompts", "prompts": str(PROMPTS), "resolution": 16, "real_data": str(tmp / "real")},
           "train": {"batch_size": 4, "max_steps": 3, "reg_weight": 0.0, "fake_updates_per_generator": 2,
                     "gan_weight_generator": 0.1, "gan_weight_fake": 1.0, "generator_timesteps": STEPS,
                     "fake_t_range": "all", "log_every": 1, "sample_every": 0, "save_every": 2, "threads": 1},
           "eval": {"num_samples": 6, "batch_size": 3}}
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "engine/encode_real.py", "--config", str(tmp / "cfg.json"), "--images",
                        str(images), "--out", str(tmp / "real"), "--loader", "pil"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("engine/train.py", "--config", str(tmp / "cfg.json"), "--out", str(tmp / "run"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_the_gan_trains_on_the_encoded_latents(dmd2_run):
    log = [json.loads(l) for l in (dmd2_run / "run" / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == [1, 2, 3]
    assert all(l["loss_gan_d"] > 0 and 0 < l["d_real"] < 1 and l["loss_gan_g"] > 0 for l in log)
    from engine.files import load_tensors
    state = load_tensors(dmd2_run / "run" / "checkpoint" / "state.pt", "cpu")
    assert any(k.startswith("gan_head.") for k in state["models"]["fake"])  # the head is checkpointed
    real = json.loads((dmd2_run / "real" / "manifest.json").read_text())
    assert real["kind"] == "latents" and real["count"] == 8 and real["shape"] == [4, 8, 8]


def test_the_export_is_a_stock_pipeline_running_the_generators_steps(dmd2_run):
    """The trained 2-step generator, exported: the stock pipeline with its exported LCMScheduler runs t = 999
    then 499, and given the same draws (initial latents scaled to the generator's start, then one fresh noise)
    lands on the generator's own latents."""
    from diffusers import StableDiffusionPipeline

    from engine.exported import open_generator
    folder = dmd2_run / "run" / "generator"
    meta = json.loads((folder / "dmd_model.json").read_text())
    assert meta["timesteps"] == STEPS and meta["pipeline_call"]["num_inference_steps"] == 2
    from safetensors.torch import load_file
    assert not any("gan_head" in k for k in load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    prompts = ["a red bicycle", "a bowl of soup"]
    g = torch.Generator().manual_seed(3)
    zs = [torch.randn((2, 4, 8, 8), generator=g) for _ in STEPS]  # the pipeline's draws, in its order
    g = torch.Generator().manual_seed(3)
    lat = pipe(prompts, **meta["pipeline_call"], output_type="latent", generator=g,
               latents=torch.randn((2, 4, 8, 8), generator=g) * meta["start_sigma"]).images
    assert pipe.scheduler.timesteps.tolist() == STEPS
    p = open_generator(folder)
    with torch.no_grad():
        want = p.generator(torch.cat(zs, 1), p.encoder.text_encoder(p.token_ids(prompts)).last_hidden_state)
    torch.testing.assert_close(lat, want, rtol=1e-5, atol=5e-4)
    r = run("engine/infer.py", "--checkpoint", str(folder), "--num", "2", "--prompt", prompts[0], "--out",
            str(dmd2_run / "s.npz"))
    assert r.returncode == 0 and "2-step generator (timesteps 999, 499" in r.stdout, r.stdout + r.stderr[-2000:]


def test_a_second_phase_starts_from_the_first_runs_networks(dmd2_run, tmp_path):
    """DMD2's SD1.5 recipe: phase 2 (model.init_from, a lower rate) starts from phase 1's generator and fake score;
    the text kind's exports (a pipeline folder and a UNet2DConditionModel folder) are what it reads."""
    from safetensors.torch import load_file
    cfg = json.loads((dmd2_run / "cfg.json").read_text())
    cfg["model"]["init_from"] = str(dmd2_run / "run")
    cfg["train"].update(lr_generator=5e-7, lr_fake=5e-7)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = run("engine/train.py", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "p2"), "--quiet",
            "--max-steps", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    for part in ("generator", "fake_score"):
        a, b = (load_file(str(f / part / "unet" / "diffusion_pytorch_model.safetensors"))
                for f in (dmd2_run / "run", tmp_path / "p2"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert json.loads((tmp_path / "p2" / "fake_score" / "unet" / "config.json").read_text())["_class_name"] == \
        "UNet2DConditionModel"
