"""The latent text-to-image path (model.kind "sd15") on a toy Stable-Diffusion folder made here
(models.sd15.make_tiny_sd: random weights, SD1.5's layout and schedule): prompt conditioning with
classifier-free guidance on the empty prompt, pairs tied to the prompt list, LPIPS on decoded images, the
exported generator as a stock StableDiffusionPipeline, infer.py with prompts, and ZeRO-3 parity."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_config_cli import run

PROMPTS = ROOT / "assets" / "prompts" / "demo.txt"
STEPS = 4


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from models.sd15 import make_tiny_sd
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny_sd")


def _cfg(tmp_path, folder, zero=False, name="cfg.json", **data):
    cfg = {"name": "tinysd", "model": {"kind": "sd15", "teacher": str(folder)},
           "data": {"dataset": "prompts", "prompts": str(PROMPTS), "resolution": 16, "num_pairs": 12,
                    "pair_sampler": "ddim", "pair_steps": 4, "pair_guidance": 3.0, "shard_size": 6,
                    "pair_batch_size": 6, "pairs_dir": str(tmp_path / "pairs"), **data},
           "train": {"batch_size": 4, "reg_batch_size": 2, "max_steps": STEPS, "lpips_backbone": "random",
                     "lpips_size": 32, "real_guidance": 3.0, "log_every": 1, "sample_every": 2, "save_every": 2,
                     "threads": 1},
           "eval": {"num_samples": 10, "batch_size": 4},
           "deepspeed": {"enabled": zero}}
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return p


def _text(folder, tmp_path):
    from engine.kinds import load_teacher
    from engine.config import DMDConfig, load
    from engine.text2image import load_text
    cfg = load(_cfg(tmp_path, folder), DMDConfig)
    teacher, _ = load_teacher(cfg)
    return teacher, load_text(cfg, teacher)


def test_prompts_condition_the_teacher_and_guidance_uses_the_empty_prompt(tiny_sd, tmp_path):
    teacher, text = _text(tiny_sd, tmp_path)
    assert text.num_prompts == 30 and teacher.sample_shape == (4, 8, 8)
    idx = torch.tensor([0, 5, 29])
    emb = text.embed(idx)
    assert emb.shape == (3, 16, 32)
    assert torch.equal(emb[1], text.encoder([text.prompts[5]])[0])
    assert not torch.allclose(emb[0], emb[1])  # different prompts, different conditions
    x_t, t = torch.randn(3, 4, 8, 8), torch.tensor([100, 500, 900])
    with torch.no_grad():
        mu_c, mu_u = teacher(x_t, t, emb), teacher(x_t, t, text.null.expand_as(emb))
        want = mu_u + 3.0 * (mu_c - mu_u)
        got = teacher.guided(x_t, t, emb, 3.0)
    assert (mu_c - mu_u).abs().max() > 1e-3  # the prompt matters, so the check below is not vacuous
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    teacher.null_cond = None
    with pytest.raises(ValueError, match="null_cond"):
        teacher.guided(x_t, t, emb, 3.0)


def test_regression_compares_decoded_images_and_trains_through_the_decoder(tiny_sd, tmp_path):
    from engine.losses import MSERegression
    from engine.text2image import DecodedRegression
    _, text = _text(tiny_sd, tmp_path)
    loss = DecodedRegression(MSERegression(), text.decode)
    x, y = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8)
    val = loss(x, y)
    with torch.no_grad():
        img_x, img_y = text.decode(x), text.decode(y)
    assert img_x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(val, (img_x - img_y).square().flatten(1).mean(1))
    assert not torch.allclose(val, MSERegression()(x, y))  # not the latent-space loss
    val.sum().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in text.decoder.parameters())


@pytest.fixture(scope="module")
def sd_run(tiny_sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdrun")
    r = run("engine/train.py", "--config", str(_cfg(tmp, tiny_sd)), "--out", str(tmp / "run"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


def test_sd15_run_trains_with_both_losses(sd_run):
    log = [json.loads(l) for l in (sd_run / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == list(range(1, STEPS + 1))
    for l in log:
        for k in ("loss_dm", "loss_reg", "loss_fake", "grad_norm_g"):
            assert np.isfinite(l[k]), (l["step"], k)
    assert max(l["loss_dm"] for l in log) > 0 and min(l["loss_reg"] for l in log) > 0
    man = json.loads((sd_run.parent / "pairs" / "manifest.json").read_text())
    assert man["num_classes"] == 30 and man["shape"] == [4, 8, 8] and len(man["prompts_hash"]) == 64
    with np.load(sd_run / "samples.npz") as f:
        assert f["images"].shape == (10, 16, 16, 3) and f["images"].dtype == np.uint8
        assert list(f["labels"]) == list(range(10))  # prompt indices
    assert (sd_run / "grid_step000002.png").is_file()


def test_training_grids_of_a_text_model_hold_16_images_and_their_prompts(sd_run):
    """train.sample_count 0 = 16 for text models; each grid carries its prompts under the images and in
    TensorBoard's text tab."""
    from PIL import Image
    with np.load(sd_run / "samples_step000002.npz") as f:
        assert f["images"].shape == (16, 16, 16, 3)
        labels = list(f["labels"])
    img = Image.open(sd_run / "grid_step000002.png")
    tiles = 4 * 17 + 1  # 4 x 4 tiles of 16 px, 1 px gaps, upscaled 4x
    assert img.width == tiles * 4 and img.height > tiles * 4  # the caption band below the tiles
    band = np.asarray(img.convert("L"))[tiles * 4:]
    assert (band < 128).sum() > 100  # text was drawn
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(sd_run / "tb"), size_guidance={"tensors": 0}).Reload()
    text = [t for t in ev.Tags()["tensors"] if "prompts" in t]
    assert text, ev.Tags()
    logged = ev.Tensors(text[0])[0].tensor_proto.string_val[0].decode()
    prompts = PROMPTS.read_text().splitlines()
    assert logged.splitlines()[0] == f"1. {prompts[labels[0]].strip()}"


def test_pairs_are_the_guided_teacher_on_the_prompt_and_pinned_to_the_prompt_list(sd_run, tiny_sd, tmp_path):
    from engine.config import DMDConfig, load
    from engine.pairs import PairReader, PairsError, expected_manifest, noise_for
    from engine.text2image import load_text
    from models import weights_hash
    from models.samplers import sample
    teacher, text = _text(tiny_sd, tmp_path)
    folder = sd_run.parent / "pairs"
    cfg = load(sd_run / "config.json", DMDConfig)
    expect = expected_manifest(weights_hash(tiny_sd), cfg.data, (4, 8, 8), 30, text)
    z, y, lab = PairReader(folder, expect).batch([7, 8])
    assert list(lab) == [7, 8]
    torch.testing.assert_close(z, noise_for([7, 8], (4, 8, 8), 1_000_000))
    with torch.no_grad():
        want = sample(teacher, z, text.embed(lab), "ddim", 4, 3.0)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    other = tmp_path / "other.txt"  # the same number of prompts, one word changed
    other.write_text(PROMPTS.read_text().replace("red bicycle", "blue bicycle"))
    cfg2 = load(sd_run / "config.json", DMDConfig, [f"data.prompts={other}"])
    text2 = load_text(cfg2, teacher)
    with pytest.raises(PairsError, match="prompts_hash"):
        PairReader(folder, expected_manifest(weights_hash(tiny_sd), cfg2.data, (4, 8, 8), 30, text2))


def test_exported_generator_is_a_one_step_stock_pipeline(sd_run):
    from diffusers import StableDiffusionPipeline
    from engine.sampling import to_uint8
    pipe = StableDiffusionPipeline.from_pretrained(sd_run / "generator")
    prompts = [l.strip() for l in PROMPTS.read_text().splitlines()][:10]
    z = torch.randn((10, 4, 8, 8), generator=torch.Generator().manual_seed(12345))  # train.py's final draw
    sigma = json.loads((sd_run / "generator" / "dmd_model.json").read_text())
    from models import OneStepGenerator
    gen = OneStepGenerator.from_pretrained(sd_run / "generator")
    assert gen.timestep == 999 and sigma["one_step_timestep"] == 999
    with torch.no_grad():
        img = pipe(prompts, latents=gen.denoiser.schedule.sigma_last * z, num_inference_steps=1, guidance_scale=1.0,
                   output_type="pt", height=16, width=16).images
    assert list(pipe.scheduler.timesteps) == [999]
    with np.load(sd_run / "samples.npz") as f:
        want = f["images"]
    diff = np.abs(to_uint8(img * 2 - 1).astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_infer_draws_from_given_prompts(sd_run, tmp_path):
    out = tmp_path / "s.npz"
    r = run("engine/infer.py", "--checkpoint", str(sd_run), "--prompt", "a red bicycle", "--prompt", "a fox",
            "--num", "4", "--out", str(out), "--grid", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(out) as f:
        assert f["images"].shape == (4, 16, 16, 3) and list(f["labels"]) == [0, 1, 0, 1]
        imgs = f["images"].astype(int)
    assert np.abs(imgs[0] - imgs[1]).max() > 0  # two prompts, two different images
    r = run("engine/infer.py", "--checkpoint", str(sd_run), "--teacher", "--sampler", "ddim", "--steps", "3",
            "--guidance", "3", "--num", "2", "--out", str(tmp_path / "t.npz"))
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("data.prompts=/nonexistent/p.txt", "data.prompts: file '/nonexistent/p.txt' not found"),
    ("data.dataset=digits", "model.kind 'sd15' needs data.dataset 'prompts', got 'digits'"),
    ("data.resolution=15", "data.resolution = 15 is not a multiple of the autoencoder's factor 2"),
])
def test_bad_text_settings_are_one_line(tiny_sd, tmp_path, override, message):
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_sd)), "--out", str(tmp_path / "r"),
            "--set", override)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert message in r.stderr


def test_real_size_text_encoder_and_vae_configs():
    """SD1.5's CLIP ViT-L/14 text encoder and its VAE, built on the meta device from the configs written out."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    from models.sd15 import SD15_TEXT_CONFIG, SD15_VAE_CONFIG
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    assert sum(p.numel() for p in text.parameters()) == 123_060_480
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # 512 px -> 64 x 64 latents


def test_zero3_two_processes_match_one(tiny_sd, sd_run, tmp_path):
    pytest.importorskip("deepspeed")
    from test_zero3 import launch
    cfg = _cfg(sd_run.parent, tiny_sd, zero=True, name="cfg_zero.json")  # same pairs folder as sd_run
    r = launch(cfg, tmp_path / "z")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    one = [json.loads(l) for l in (sd_run / "log.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "z" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(one, two, strict=True):
        for k in ("loss_dm", "loss_reg", "loss_fake", "loss_g"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])
    assert (tmp_path / "z" / "generator" / "model_index.json").is_file()
