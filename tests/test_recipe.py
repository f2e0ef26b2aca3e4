"""DMD2's recipe switches: trained copies without dropout (the default), the fake score's timestep range, DMD2's
AdamW settings, and the LR warm-up in the one-process backend (ZeRO-3 uses the same scheduler function through
DeepSpeed)."""
import pytest
import torch

from test_guards import _trainer


@pytest.fixture(scope="module")
def dropout_teacher(tmp_path_factory):
    """A tiny class-conditional teacher whose UNet has dropout, as the digits teacher (0.1) has."""
    from diffusers import UNet2DModel
    from models import Denoiser, NoiseSchedule
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=8, num_class_embeds=11, dropout=0.3)
    folder = tmp_path_factory.mktemp("dropout") / "teacher"
    Denoiser(net, NoiseSchedule.edm(), "epsilon", 10, 10, (1, 8, 8)).save_pretrained(folder)
    return folder


def test_trained_copies_have_no_dropout_by_default(dropout_teacher):
    z, c = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    m = _trainer(dropout_teacher).m
    assert m.generator.training and m.fake.training  # train mode still; only the rates are zero
    with torch.no_grad():
        a, b = m.generator(z, c), m.generator(z, c)
        t = torch.full((3,), 500)
        f1, f2 = m.fake(z, t, c), m.fake(z, t, c)
        from models import OneStepGenerator
        teacher_one_step = OneStepGenerator(m.teacher).eval()(z, c)  # the teacher as it scores: eval mode
    assert torch.equal(a, b) and torch.equal(f1, f2)
    torch.testing.assert_close(a, teacher_one_step)  # at initialisation the generator IS the teacher
    kept = _trainer(dropout_teacher, dropout="teacher").m
    with torch.no_grad():
        assert not torch.equal(kept.generator(z, c), kept.generator(z, c))  # the teacher's 0.3, kept
    assert any(isinstance(x, torch.nn.Dropout) and x.p == 0.3 for x in kept.teacher.modules())  # teacher untouched


@pytest.mark.parametrize("choice, lo, hi", [("dm", 20, 980), ("all", 0, 999)])
def test_fake_score_timestep_range(tiny_teacher_dir, monkeypatch, choice, lo, hi):
    import engine.trainer as trainer
    seen = []
    real = trainer.denoising_loss

    def spy(model, x, t, eps, cond, weighting):
        seen.append(t.clone())
        return real(model, x, t, eps, cond, weighting)
    monkeypatch.setattr(trainer, "denoising_loss", spy)
    tr = _trainer(tiny_teacher_dir, batch_size=256, fake_t_range=choice)
    for _ in range(4):
        tr.fake_step()
    t = torch.cat(seen)
    assert t.min() >= lo and t.max() <= hi
    assert t.min() < lo + 8 and t.max() > hi - 8  # the whole range is used, not a narrower one


def test_dmd2_adamw_settings_reach_both_optimisers(tiny_teacher_dir):
    m = _trainer(tiny_teacher_dir, betas=[0.9, 0.999], weight_decay=0.01).m
    for opt in m.opt.values():
        g = opt.param_groups[0]
        assert g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0.01


def test_one_process_lr_warm_up_and_its_checkpoint(tiny_teacher_dir):
    from engine.config import DMDConfig, parse
    from engine.plain import PlainBackend
    from engine.trainer import DMDTrainer
    cfg = parse(DMDConfig, {"model": {"kind": "unet", "teacher": str(tiny_teacher_dir)},
                            "train": {"batch_size": 4, "reg_weight": 0.0, "kernels": "eager", "lr_generator": 1e-4,
                                      "lr_fake": 2e-4}, "deepspeed": {"lr_warmup_steps": 4}})
    tr = DMDTrainer(PlainBackend(cfg, "cpu"), cfg.train, seed=3)
    seen = [tr.m.lrs()]
    for _ in range(5):
        tr.train_step()
        seen.append(tr.m.lrs())
    gen = [round(s["lr_generator"] / 1e-4, 6) for s in seen]
    assert gen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # linear to the configured rate in 4 updates, then constant
    assert [round(s["lr_fake"] / 2e-4, 6) for s in seen] == gen
    state = tr.m._state_dict()
    again = PlainBackend(cfg, "cpu")
    assert again.lrs()["lr_generator"] == pytest.approx(0.25e-4)
    again._load_state_dict(state)  # resume: the schedule continues where it was
    assert again.lrs() == tr.m.lrs()
