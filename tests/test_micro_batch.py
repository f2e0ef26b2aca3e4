"""train.micro_batch_size: a global batch split into micro-batches whose gradients accumulate into one update
must give the update the whole batch gives, within fp32 round-off (the DM normaliser is per sample, and each
micro-batch's mean loss is weighted by its share). The 2-process ZeRO-3 twin is in tests/test_zero3.py."""
import math

import pytest
import torch

from engine.config import DMDConfig, parse
from engine.losses import make_regression_loss
from engine.plain import PlainBackend
from engine.trainer import DMDTrainer


def _trainer(model: dict, micro: int, **train):
    cfg = parse(DMDConfig, {"model": model, "train": {"batch_size": 10, "reg_batch_size": 6, "micro_batch_size": micro,
                                                      "fake_updates_per_generator": 2, **train}})
    torch.manual_seed(0)  # the toy's generator and fake score start from random weights: the same ones
    return DMDTrainer(PlainBackend(cfg, "cpu"), cfg.train, regression=make_regression_loss(cfg.train), seed=5)


def _ref(m, seed: int):
    g = torch.Generator().manual_seed(seed)
    n, nc = 6, m.num_classes
    z = torch.randn((n, *m.sample_shape), generator=g)
    y = torch.randn((n, *m.sample_shape), generator=g) * 0.5
    c = torch.randint(0, nc, (n,), generator=g) if nc else None
    return z, y, c


def _compare(whole, split, steps=3, rel=1e-5):
    for s in range(steps):
        lw = whole.train_step(_ref(whole.m, s))
        ls = split.train_step(_ref(split.m, s))
        assert lw.keys() == ls.keys()
        for k in lw:
            assert ls[k] == pytest.approx(lw[k], rel=rel, abs=1e-7), (s, k, lw[k], ls[k])
    for net in ("generator", "fake"):
        for (n, pw), ps in zip(getattr(whole.m, net).named_parameters(), getattr(split.m, net).parameters()):
            torch.testing.assert_close(ps, pw, rtol=rel, atol=1e-6, msg=lambda m: f"{net}.{n}: {m}")
    assert lw["loss_dm"] > 0 and lw["loss_reg"] > 0 and math.isfinite(lw["grad_norm_g"])


@pytest.mark.parametrize("micro", [3, 4])  # 10 = 3+3+3+1 and 4+4+2; the regression batch 6 = 3+3 and 4+2
def test_toy_micro_batches_equal_the_whole_batch(micro):
    model = {"kind": "toy2d", "toy_hidden": 32}
    _compare(_trainer(model, 0, regression_loss="mse"), _trainer(model, micro, regression_loss="mse"))


def test_unet_micro_batches_equal_the_whole_batch(tiny_teacher_dir):
    """A dropout-free UNet with its fake score, the LPIPS regression and CFG in the real score."""
    model = {"kind": "unet", "teacher": str(tiny_teacher_dir)}
    kw = dict(lpips_backbone="random", real_guidance=2.0)
    _compare(_trainer(model, 0, **kw), _trainer(model, 4, **kw), steps=2, rel=1e-4)


def test_draws_do_not_depend_on_the_micro_batch_size():
    """The shared noise stream advances by the same draws whatever the split."""
    model = {"kind": "toy2d", "toy_hidden": 32}
    a, b = _trainer(model, 0, regression_loss="mse"), _trainer(model, 3, regression_loss="mse")
    a.train_step(_ref(a.m, 0))
    b.train_step(_ref(b.m, 0))
    assert torch.equal(a.rng.get_state(), b.rng.get_state())


def test_a_non_finite_micro_batch_drops_the_whole_update():
    """The guard judges the whole update: a NaN in one micro-batch's gradients only (its loss finite) leaves
    both models as they were."""
    model = {"kind": "toy2d", "toy_hidden": 32}
    t = _trainer(model, 3, regression_loss="mse")
    before = {n: {k: v.clone() for k, v in getattr(t.m, n).state_dict().items()} for n in ("generator", "fake")}
    gen, calls = t.gen, []

    def second_poisoned(z, c=None):
        x = gen(z, c)
        calls.append(1)
        if len(calls) == 2:  # the second DM micro-batch of the update
            x.register_hook(lambda g: g * float("nan"))
        return x
    second_poisoned.step_begin = lambda: None  # what a compiled generator's wrapper offers
    t.gen = second_poisoned
    logs = t.train_step(_ref(t.m, 0))
    assert len(calls) > 2 and math.isfinite(logs["loss_g"]) and not math.isfinite(logs["grad_norm_g"])
    assert logs["skipped"] == 1.0
    for n in ("generator", "fake"):
        for k, v in getattr(t.m, n).state_dict().items():
            assert torch.equal(v, before[n][k]), (n, k)
    t.gen = gen
    assert t.train_step(_ref(t.m, 1))["skipped"] == 0.0  # the next update starts clean


def test_one_process_bf16_keeps_fp32_masters_and_trains(tiny_teacher_dir):
    """deepspeed.precision / teacher_dtype also switch the one-process backend: bf16 teacher, fp32 trained
    weights computing under bf16 autocast (asked for explicitly here; "auto" picks it on a GPU only)."""
    cfg = parse(DMDConfig, {"model": {"kind": "unet", "teacher": str(tiny_teacher_dir)},
                            "train": {"batch_size": 6, "reg_weight": 0.0},
                            "deepspeed": {"precision": "bf16", "teacher_dtype": "bf16"}})
    m = PlainBackend(cfg, "cpu")
    assert {p.dtype for p in m.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m.generator.parameters()} == {p.dtype for p in m.fake.parameters()} == {torch.float32}
    t = DMDTrainer(m, cfg.train, seed=1)
    before = [p.detach().clone() for p in m.generator.parameters()]
    with m.autocast():
        assert torch.is_autocast_enabled("cpu")
        logs = [t.train_step() for _ in range(2)]
    assert all(math.isfinite(v) for l in logs for v in l.values()) and logs[-1]["skipped"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, m.generator.parameters()))
    assert {p.dtype for p in m.generator.parameters()} == {torch.float32}
    whole, _ = m.whole_teacher()  # pairs are made by an fp32 teacher whatever the training precision
    assert {p.dtype for p in whole.parameters()} == {torch.float32}
    auto = parse(DMDConfig, {"model": {"kind": "unet", "teacher": str(tiny_teacher_dir)}})
    cpu = PlainBackend(auto, "cpu")
    assert not cpu.autocast_on and {p.dtype for p in cpu.teacher.parameters()} == {torch.float32}


def test_grids_stay_within_2048_px_and_small_images_look_as_before(tmp_path):
    """Sample grids: 512 px samples shrink to fit 2048 px a side (a 100-image grid was 20,524 px);
    digits-size images keep the 4x upscaled 10 x 10 layout."""
    import numpy as np
    from PIL import Image
    from engine.sampling import save_grid
    big = np.random.default_rng(0).integers(0, 255, (100, 512, 512, 3), dtype=np.uint8)
    save_grid(big, tmp_path / "big.png")
    assert max(Image.open(tmp_path / "big.png").size) <= 2048
    save_grid(big[:16], tmp_path / "sixteen.png", captions=[f"prompt {i}" for i in range(16)])
    w, h = Image.open(tmp_path / "sixteen.png").size
    assert max(w, h) <= 2048 and h > w  # four tiles a row, a caption band below, all within 2048 px
    save_grid(big, tmp_path / "hundred.png", captions=[f"prompt {i}" for i in range(100)])
    assert max(Image.open(tmp_path / "hundred.png").size) <= 2048
    small = np.zeros((100, 8, 8, 1), np.uint8)
    save_grid(small, tmp_path / "digits.png")
    assert Image.open(tmp_path / "digits.png").size == ((10 * 9 + 1) * 4,) * 2
