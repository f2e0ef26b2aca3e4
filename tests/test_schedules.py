import pytest
import torch

from models import NoiseSchedule

SCHEDULES = {
    "vp-linear": lambda: NoiseSchedule.vp(1000, 1e-4, 0.02, "linear"),
    "vp-scaled": lambda: NoiseSchedule.vp(1000, 0.00085, 0.012, "scaled_linear"),
    "vp-cosine": lambda: NoiseSchedule.vp(1000, beta_schedule="squaredcos_cap_v2"),
    "edm": lambda: NoiseSchedule.edm(),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_eps_v_x0_round_trips(name):
    sch = SCHEDULES[name]()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 5, 7, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 5, 7, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    x_t = sch.add_noise(x0, eps, t)
    torch.testing.assert_close(sch.eps_from_x0(x_t, x0, t), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sch.x0_from_eps(x_t, eps, t)[:5], x0[:5], rtol=1e-3, atol=1e-3)
    if sch.kind == "vp":
        v = sch.v_from_x0(x_t, x0, t)
        a, s = sch.coeffs(t, x0)
        torch.testing.assert_close(v, a * eps - s * x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sch.x0_from_v(x_t, v, t), x0, rtol=1e-4, atol=1e-4)


def test_vp_matches_diffusers_ddpm():
    from diffusers import DDPMScheduler
    for bs, b0, b1 in [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 1e-4, 0.02)]:
        ref = DDPMScheduler(num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=bs)
        sch = NoiseSchedule.vp(1000, b0, b1, bs)
        torch.testing.assert_close(sch.alpha ** 2, ref.alphas_cumprod.float(), rtol=1e-4, atol=1e-6)


def test_edm_grid_is_karras():
    sch = NoiseSchedule.edm(1000, 0.002, 80.0, 7.0)
    assert sch.sigma[0].item() == pytest.approx(0.002, rel=1e-5)
    assert sch.sigma[-1].item() == pytest.approx(80.0, rel=1e-5)
    assert torch.all(sch.sigma[1:] > sch.sigma[:-1]) and torch.all(sch.alpha == 1)
    torch.testing.assert_close(sch.net_time, 0.25 * sch.sigma.log())
    assert sch.nearest_t(torch.tensor([80.0, 0.002, 1.0])).tolist()[:2] == [999, 0]


def test_sample_t_range():
    sch = NoiseSchedule.edm()
    t = sch.sample_t(20000, 0.02, 0.98, torch.Generator().manual_seed(0))
    assert t.min().item() == 20 and t.max().item() == 980


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_loss_weight_matches_native_loss(pred):
    sch = NoiseSchedule.vp(1000, 0.00085, 0.012, "scaled_linear")
    g = torch.Generator().manual_seed(1)
    x0, eps, x0_hat = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([3, 100, 600, 990])
    x_t = sch.add_noise(x0, eps, t)
    if pred == "epsilon":
        native = (sch.eps_from_x0(x_t, x0_hat, t) - eps).square().mean((1, 2, 3))
    elif pred == "v_prediction":
        native = (sch.v_from_x0(x_t, x0_hat, t) - sch.v_from_x0(x_t, x0, t)).square().mean((1, 2, 3))
    else:
        native = (x0_hat - x0).square().mean((1, 2, 3))
    weighted = sch.loss_weight(t, pred).double() * (x0_hat - x0).square().mean((1, 2, 3))
    torch.testing.assert_close(weighted, native, rtol=1e-3, atol=1e-6)
