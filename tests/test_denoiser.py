import json

import pytest
import torch

from conftest import tiny_denoiser
from models import Denoiser, ModelFolderError, OneStepGenerator
from models.samplers import nfe, sample
from models.toy import GaussianMixtureDenoiser, mode_shares


@pytest.mark.parametrize("kind,pred", [("edm", "epsilon"), ("vp", "epsilon"), ("vp", "v_prediction"), ("vp", "sample")])
def test_denoiser_returns_x0_for_every_parameterisation(kind, pred):
    """Feeding the network's output through the parameterisation must invert it exactly."""
    d = tiny_denoiser(kind, pred)
    x_t, t, c = torch.randn(3, 1, 8, 8), torch.tensor([5, 400, 999]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        raw = d._net(x_t if kind == "vp" else x_t / (d.schedule.sigma[t].view(-1, 1, 1, 1) ** 2 + 0.25).sqrt(),
                     d.schedule.time_input(t), c)
        x0 = d(x_t, t, c)
    sch = d.schedule
    if kind == "edm":
        s = sch.sigma[t].view(-1, 1, 1, 1)
        want = 0.25 / (s ** 2 + 0.25) * x_t + s * 0.5 / (s ** 2 + 0.25).sqrt() * raw
    elif pred == "epsilon":
        want = sch.x0_from_eps(x_t, raw, t)
    elif pred == "v_prediction":
        want = sch.x0_from_v(x_t, raw, t)
    else:
        want = raw
    torch.testing.assert_close(x0, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["edm", "vp"])
def test_save_and_load_round_trip(tmp_path, kind):
    d = tiny_denoiser(kind)
    d.save_pretrained(tmp_path / "m")
    e = Denoiser.from_pretrained(tmp_path / "m")
    assert e.schedule.kind == kind and e.num_classes == 10 and e.null_class == 10 and e.sample_shape == (1, 8, 8)
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(d(x, t, c), e(x, t, c))


def test_missing_teacher_folder_is_clear(tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        Denoiser.from_pretrained(tmp_path / "nope")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelFolderError, match="unet/config.json"):
        Denoiser.from_pretrained(tmp_path / "half")


def test_generator_export_loads_with_stock_diffusers(tmp_path):
    from diffusers import EDMEulerScheduler, UNet2DModel
    g = OneStepGenerator(tiny_denoiser())
    g.save_pretrained(tmp_path / "gen")
    unet = UNet2DModel.from_pretrained(tmp_path / "gen" / "unet")
    sched = EDMEulerScheduler.from_pretrained(tmp_path / "gen" / "scheduler")
    assert json.loads((tmp_path / "gen" / "dmd_model.json").read_text())["one_step_timestep"] == 999
    z, c = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    # one step by hand with stock diffusers parts: EDM preconditioning at sigma_max
    sigma = torch.tensor(sched.config.sigma_max)
    x = sigma * z
    with torch.no_grad():
        out = unet(sched.precondition_inputs(x, sigma), sched.precondition_noise(sigma).expand(4), class_labels=c).sample
        want = sched.precondition_outputs(x, out, sigma)
        got = OneStepGenerator.from_pretrained(tmp_path / "gen")(z, c)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler,steps", [("heun", 18), ("ddim", 40)])
def test_samplers_reproduce_an_exact_teacher(sampler, steps):
    """With the analytic mixture denoiser the ODE sampler must land on the mixture: half per mode, std 0.5."""
    t = GaussianMixtureDenoiser()
    x = sample(t, torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)), None, sampler, steps)
    left, right = mode_shares(x)
    assert abs(left - 0.5) < 0.05 and abs(right - 0.5) < 0.05
    assert abs(x[:, 1].std().item() - 0.5) < 0.05
    assert nfe(sampler, steps) == (2 * steps - 1 if sampler == "heun" else steps)


def test_guidance_scale_one_is_plain_forward():
    d = tiny_denoiser()
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([100, 500]), torch.tensor([4, 5])
    with torch.no_grad():
        torch.testing.assert_close(d.guided(x, t, c, 1.0), d(x, t, c))
        g2 = d.guided(x, t, c, 2.0)
        torch.testing.assert_close(g2, 2 * d(x, t, c) - d(x, t, torch.full_like(c, 10)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["edm", "vp"])
def test_generator_traces_without_graph_breaks(kind):
    # a graph break (a .item() or a host copy of t) would cost a device sync per call and rule out CUDA graphs
    gen = OneStepGenerator(tiny_denoiser(kind)).eval()
    z, c = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gen)(z, c)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_sd15_architecture_is_the_real_one():
    """models/sd15.py (the benchmarks' SD1.5 UNet) has SD1.5's 859,520,964 parameters (built on the meta device:
    no memory) and its 1000-step scaled-linear schedule."""
    from diffusers import UNet2DConditionModel
    from models.sd15 import SD15_UNET_CONFIG, sd15_schedule
    with torch.device("meta"):
        net = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert sum(p.numel() for p in net.parameters()) == 859_520_964
    sch = sd15_schedule()
    assert sch.T == 1000 and abs(float(sch.alpha[-1] ** 2) - 0.0047) < 1e-4  # alphas_cumprod[-1] of SD1.5
