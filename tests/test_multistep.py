"""Multi-step generators (DMD2, train.generator_timesteps): the K-step forward is the plain loop of denoiser
calls on the noises it is given; the steps survive a save and load, and bad ones are refused; an exported
tiny-SD K-step generator samples the same images in the stock StableDiffusionPipeline (LCMScheduler) as in
the engine; infer.py samples K-step folders, compiled as eager."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_denoiser
from test_config_cli import run

STEPS = [999, 749, 499, 249]  # DMD2's four steps: evenly spaced, so num_inference_steps=4 selects them
UNEVEN = [999, 800, 500, 200]  # no even spacing gives these: the stock call passes timesteps=
PROMPTS = ["a red bicycle", "a fox", "a bowl of soup"]


def _by_hand(d, steps, zs, cond):
    """DMD2's sampler written out: x_{t_0} = sigma_{t_0} z_0, then x0 -> alpha_t x0 + sigma_t z_k -> x0."""
    a, s = d.schedule.alpha, d.schedule.sigma
    at = lambda t: torch.full((len(zs[0]),), t)  # noqa: E731
    x0 = d(float(s[steps[0]]) * zs[0], at(steps[0]), cond)
    for k in range(1, len(steps)):
        t = steps[k]
        x0 = d(float(a[t]) * x0 + float(s[t]) * zs[k], at(t), cond)
    return x0


@pytest.mark.parametrize("kind", ["vp", "edm"])
def test_k_step_forward_is_the_loop_of_denoiser_calls(kind):
    from engine.sampling import noise_shape
    from models import OneStepGenerator
    d = tiny_denoiser(kind).eval()
    c = torch.tensor([0, 3, 7])
    for steps in ([999], STEPS, [900, 20]):
        g = OneStepGenerator(d, timesteps=steps)
        assert g.num_steps == len(steps) and noise_shape(g, (1, 8, 8)) == (len(steps), 8, 8)
        zs = [torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(len(steps))]
        with torch.no_grad():
            got, want = g(torch.cat(zs, 1), c), _by_hand(d, steps, zs, c)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the default generator is the one-step one, unchanged
        z = torch.randn(3, 1, 8, 8)
        assert torch.equal(OneStepGenerator(d)(z, c), OneStepGenerator(d, timesteps=[999])(z, c))
        later = OneStepGenerator(d, timesteps=STEPS)  # each later noise reaches the sample
        z4 = torch.randn(3, 4, 8, 8)
        z4b = z4.clone()
        z4b[:, 3] += 1
        assert (later(z4, c) - later(z4b, c)).abs().max() > 1e-3


def test_steps_survive_save_and_load_and_bad_steps_are_refused(tmp_path):
    from models import OneStepGenerator
    d = tiny_denoiser("vp").eval()
    g = OneStepGenerator(d, timesteps=STEPS)
    g.save_pretrained(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "dmd_model.json").read_text())
    assert meta["timesteps"] == STEPS
    back = OneStepGenerator.from_pretrained(tmp_path / "g").eval()
    assert back.timesteps == STEPS and back.num_steps == 4
    z, c = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(back(z, c), g(z, c), rtol=0, atol=0)
    del meta["timesteps"]  # a folder written before multi-step generators: one step at one_step_timestep
    (tmp_path / "g" / "dmd_model.json").write_text(json.dumps(meta))
    assert OneStepGenerator.from_pretrained(tmp_path / "g").timesteps == [999]
    for bad in ([249, 499, 749, 999], [999, 999, 499], [1000, 500], [999, -1]):
        with pytest.raises(ValueError, match=r"generator timesteps must be decreasing integers in \[0, 1000\)"):
            OneStepGenerator(d, timesteps=bad)
    meta["timesteps"] = [249, 999]  # a hand-edited folder is refused on load too
    (tmp_path / "g" / "dmd_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="decreasing"):
        OneStepGenerator.from_pretrained(tmp_path / "g")


def test_pipeline_scheduler_runs_exactly_the_generators_steps():
    from engine.text2image import pipeline_scheduler
    from models import NoiseSchedule
    sd = NoiseSchedule.vp(1000, 0.00085, 0.012, "scaled_linear")
    for steps, cls, call in [(None, "DDIMScheduler", {"num_inference_steps": 1}),
                             (STEPS, "LCMScheduler", {"num_inference_steps": 4}),
                             ([999, 499], "LCMScheduler", {"num_inference_steps": 2}),
                             (UNEVEN, "LCMScheduler", {"timesteps": UNEVEN})]:
        sched, got = pipeline_scheduler(sd, "epsilon", steps)
        assert type(sched).__name__ == cls and got == call, (steps, got)
        sched.set_timesteps(**call)
        assert sched.timesteps.tolist() == (steps or [999])
        if cls == "LCMScheduler":  # the step output is the x0 prediction itself (c_skip ~ 0, c_out ~ 1)
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(1)
            assert c_skip < 1e-8 and abs(1 - c_out) < 1e-8
    with pytest.raises(ValueError, match="t = 0 cannot be run"):
        pipeline_scheduler(sd, "epsilon", [999, 0])


@pytest.fixture(scope="module")
def sd_gens(tmp_path_factory):
    """A tiny SD teacher's initial generator exported with four even and four uneven steps."""
    from engine.exported import export_initial
    from models.sd15 import make_sd_folder
    tmp = tmp_path_factory.mktemp("multistep")
    teacher = make_sd_folder(tmp / "teacher", "tiny")
    return {"even": export_initial(teacher, tmp / "even", timesteps=STEPS),
            "uneven": export_initial(teacher, tmp / "uneven", timesteps=UNEVEN), "teacher": teacher}


@pytest.mark.parametrize("which", ["even", "uneven"])
def test_stock_pipeline_samples_the_exported_k_step_generator(sd_gens, which):
    """The stock call (the dmd_model.json pipeline_call; guidance_scale 1) draws its initial latents and then
    one fresh noise per later step from its generator; the engine given those draws gives the same images.
    The pipeline starts from unit noise, the generator from sigma_999 z = 0.9977 z: measured, that moves at
    most 1 level on about 5 % of pixels; with latents=start_sigma * z0 the latents agree to float rounding."""
    from diffusers import StableDiffusionPipeline
    from engine.exported import open_generator
    from engine.fast_sampler import OneStepSampler, SamplePath
    from models import Denoiser, OneStepGenerator
    folder = sd_gens[which]
    meta = json.loads((folder / "dmd_model.json").read_text())
    call = meta["pipeline_call"]
    assert call == ({"num_inference_steps": 4} if which == "even" else {"timesteps": UNEVEN}) | {"guidance_scale": 1.0}
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]
    p = open_generator(folder)
    assert p.noise_shape == (16, 8, 8) and p.sample_shape == (4, 8, 8) and p.timesteps == meta["timesteps"]
    g = torch.Generator().manual_seed(7)
    zs = [torch.randn((3, 4, 8, 8), generator=g) for _ in range(4)]  # the pipeline's draws, in its order
    # the reference is built from the teacher, not read back from the export: the exported scheduler config
    # is what both the stock pipeline and a reloaded generator read, so only this catches a wrong one
    made = OneStepGenerator(Denoiser.from_pretrained(sd_gens["teacher"]), timesteps=meta["timesteps"])
    images = [OneStepSampler(SamplePath(gen, p.encoder.text_encoder, p.decoder), "cpu", compile=False)(
        torch.cat(zs, 1), p.token_ids(PROMPTS)).int() for gen in (made, p.generator)]
    ours = images[0]
    assert torch.equal(ours, images[1]) and ours.float().std() > 10  # the reload samples alike; real images
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for exact in (False, True):
        g = torch.Generator().manual_seed(7)
        kw = {"latents": torch.randn((3, 4, 8, 8), generator=g) * meta["start_sigma"]} if exact else {}
        img = pipe(PROMPTS, **call, output_type="np", generator=g, **kw).images
        assert pipe.scheduler.timesteps.tolist() == meta["timesteps"]
        d = (torch.from_numpy((img * 255).round().astype("uint8")).int() - ours).abs()
        if exact:  # the latents agree to float rounding (measured: 3e-5 on latents up to 63 in size), so a
            # pixel differs only where a value sits on a rounding boundary
            g = torch.Generator().manual_seed(7)
            kw = {"latents": torch.randn((3, 4, 8, 8), generator=g) * meta["start_sigma"]}
            lat = pipe(PROMPTS, **call, output_type="latent", generator=g, **kw).images
            with torch.no_grad():
                want = made(torch.cat(zs, 1), p.encoder.text_encoder(p.token_ids(PROMPTS)).last_hidden_state)
            torch.testing.assert_close(lat, want, rtol=1e-5, atol=5e-4)
            assert d.max() <= 1 and (d > 0).float().mean() < 0.005, (d.max(), (d > 0).float().mean())
        else:
            assert d.max() <= 1 and (d > 0).float().mean() < 0.10, (d.max(), (d > 0).float().mean())


@pytest.fixture(scope="module")
def unet_gen(tmp_path_factory, tiny_teacher_dir):
    from engine.exported import export_initial
    return export_initial(tiny_teacher_dir, tmp_path_factory.mktemp("unet4") / "gen", timesteps=STEPS)


@pytest.mark.parametrize("which", ["unet", "sd"])
def test_infer_samples_k_step_folders_compiled_as_eager(unet_gen, sd_gens, which, tmp_path):
    folder = unet_gen if which == "unet" else sd_gens["even"]
    extra = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1]] if which == "sd" else []
    images = {}
    # compiled only for the UNet: a cold compile of the 4-step tiny SD costs some 3 minutes on 2 CPU cores, and
    # compiled = eager for text generators is tests/test_infer.py's (one step)
    for mode in ("off", "on") if which == "unet" else ("off",):
        out = tmp_path / f"{mode}.npz"
        r = run("engine/infer.py", "--checkpoint", str(folder), "--num", "4", "--batch-size", "4", "--seed", "3",
                "--compile", mode, "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"4-step generator (timesteps 999, 749, 499, 249; 4 NFE, {'compiled' if mode == 'on' else 'eager'}" \
            in r.stdout, r.stdout
        with np.load(out) as f:
            images[mode] = f["images"]
    assert images["off"].shape == ((4, 8, 8, 1) if which == "unet" else (4, 16, 16, 3))
    assert images["off"].std() > 10
    if "on" in images:
        assert np.array_equal(images["off"], images["on"]), np.abs(images["off"].astype(int) - images["on"]).max()
