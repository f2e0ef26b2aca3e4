"""DMD2 in the trainer: the GAN head on the fake score's bottleneck and its two losses, and the multi-step
generator's backward simulation (engine/trainer.py, models/gan.py)."""
import pytest
import torch
import torch.nn.functional as F

from test_guards import _clone, _same, _trainer

STEPS = [999, 749, 499, 249]


class ListFeed:
    """Real data for the discriminator: fixed random 'real' digits with labels, handed out in order."""

    def __init__(self, n=64, seed=5):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y, self.pos = torch.rand((n, 1, 8, 8), generator=g) * 2 - 1, torch.arange(n) % 10, 0

    def next(self, bs=4):
        i = torch.arange(self.pos, self.pos + bs) % len(self.y)
        self.pos += bs
        return self.x[i], self.y[i]

    def close(self):
        pass


def _gan_trainer(teacher_dir, **train):
    tr = _trainer(teacher_dir, gan_weight_generator=0.5, gan_weight_fake=0.3, **train)
    tr.real = ListFeed()
    return tr


def _head(m):
    return list(m.fake.gan_head.parameters())


def test_gan_head_is_part_of_the_fake_score_only(tiny_teacher_dir, tmp_path):
    m = _gan_trainer(tiny_teacher_dir).m
    head = {id(p) for p in _head(m)}
    assert head and head <= {id(p) for p in m.opt["fake"].param_groups[0]["params"]}  # the fake score's optimiser
    assert not head & {id(p) for p in m.generator.parameters()}
    assert any(k.startswith("gan_head.") for k in m._state_dict()["fake"])  # in the checkpoint
    m.write_generator(tmp_path / "gen")  # the export holds the generator's network alone
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "gen" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any("gan_head" in k for k in keys)
    assert _trainer(tiny_teacher_dir).m.fake.__dict__["_modules"].get("gan_head") is None  # off by default


def test_generator_gan_loss_moves_only_the_generator(tiny_teacher_dir):
    tr = _gan_trainer(tiny_teacher_dir, dm_weight=0.0)  # the GAN term alone
    m = tr.m
    teacher0, fake0 = _clone(m.teacher), _clone(m.fake)
    logs, _, _ = tr.generator_step()
    assert logs["loss_gan_g"] > 0 and "loss_dm" not in logs
    assert all(p.grad is None for p in m.fake.parameters())  # frozen while the loss passed through it
    assert all(p.requires_grad for p in m.fake.parameters())  # and trainable again afterwards
    g0 = _clone(m.generator)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())
    m.step("generator")
    assert not _same(m.generator, g0) and _same(m.fake, fake0) and _same(m.teacher, teacher0)


def test_discriminator_loss_moves_only_the_fake_score_and_its_head(tiny_teacher_dir):
    tr = _gan_trainer(tiny_teacher_dir)
    m = tr.m
    gen0, teacher0, head0 = _clone(m.generator), _clone(m.teacher), [p.detach().clone() for p in _head(m)]
    logs = tr.fake_step()
    assert {"loss_gan_d", "d_real", "d_fake"} <= set(logs)
    assert all(p.grad is None for p in m.generator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _head(m))
    m.step("fake")
    assert _same(m.generator, gen0) and _same(m.teacher, teacher0)
    assert not all(torch.equal(p, q) for p, q in zip(_head(m), head0))
    # without the GAN the head would get nothing: the fake score's own loss does not reach it
    plain = _trainer(tiny_teacher_dir, gan_weight_fake=0.3)
    plain.real = ListFeed()
    plain.tc.gan_weight_fake = 0.0
    plain.fake_step()
    assert all(p.grad is None for p in plain.m.fake.gan_head.parameters())


def test_discriminator_loss_value(tiny_teacher_dir, monkeypatch):
    """loss_gan_d is the mean of softplus(D(fake)) + softplus(-D(real)) over the logits the head gave."""
    import engine.trainer as trainer
    seen = []
    real = trainer.discriminate

    def spy(*a):
        out = real(*a)
        seen.append(out.detach())
        return out
    monkeypatch.setattr(trainer, "discriminate", spy)
    tr = _gan_trainer(tiny_teacher_dir)
    logs = tr.fake_step()
    lf, lr = seen
    want = (F.softplus(lf) + F.softplus(-lr)).mean()
    torch.testing.assert_close(logs["loss_gan_d"], want)
    torch.testing.assert_close(logs["d_real"], torch.sigmoid(lr).mean())


def test_gan_train_step_is_reproducible_and_uses_real_data(tiny_teacher_dir):
    def run(seed_real):
        tr = _gan_trainer(tiny_teacher_dir, fake_updates_per_generator=2)
        tr.real = ListFeed(seed=seed_real)
        return [tr.train_step() for _ in range(2)], _clone(tr.m.fake)
    a, fa = run(5)
    b, fb = run(5)
    c, fc = run(6)
    assert a == b and all(torch.equal(p, q) for p, q in zip(fa, fb))
    assert not all(torch.equal(p, q) for p, q in zip(fa, fc))  # other real data, another fake score


def test_gan_noise_levels_follow_the_gan_t_range(tiny_teacher_dir, monkeypatch):
    """D's real and generated batches and G's GAN loss are noised at t in [gan_min_t_frac T, gan_max_t_frac T];
    the default spans [0, T) as DMD2 draws them."""
    import engine.trainer as trainer
    seen = []
    real = trainer.discriminate

    def spy(den, x_t, t, c):
        seen.append(t.clone())
        return real(den, x_t, t, c)
    monkeypatch.setattr(trainer, "discriminate", spy)

    def levels(**train):
        seen.clear()
        tr = _gan_trainer(tiny_teacher_dir, **train)
        for _ in range(8):
            tr.fake_step()
            tr.generator_step()
        return torch.cat(seen), tr.m.teacher.schedule.T
    t, T = levels(gan_min_t_frac=0.3, gan_max_t_frac=0.5)
    assert len(t) == 8 * 3 * 4 and int(0.3 * T) <= int(t.min()) and int(t.max()) <= int(0.5 * T)
    t, T = levels()
    assert int(t.min()) < T // 4 and int(t.max()) > 3 * T // 4
    from engine.config import ConfigError, DMDConfig, parse
    with pytest.raises(ConfigError, match="gan_max_t_frac"):
        parse(DMDConfig, {"train": {"gan_max_t_frac": 0}})
    with pytest.raises(ConfigError, match="gan_min_t_frac < gan_max_t_frac"):
        parse(DMDConfig, {"train": {"gan_min_t_frac": 0.5, "gan_max_t_frac": 0.5}})


def test_real_dequantize_spreads_real_data_over_its_grey_level_and_is_off_by_default(tiny_teacher_dir):
    """train.gan_real_dequantize = w: D's real batch is the feed's plus U(-w/2, w/2) per value, drawn from the
    trainer's seeded stream; 0 (the default) hands the feed's batch over unchanged and draws nothing."""
    def batch(**train):
        tr = _gan_trainer(tiny_teacher_dir, **train)
        x, _ = tr.real_batch()
        return x, ListFeed().next(), torch.randn(3, generator=tr.rng)
    x, (ref, _), after = batch()
    assert torch.equal(x, ref)
    w = 0.125
    xq, (ref, _), after_q = batch(gan_real_dequantize=w)
    d = xq - ref
    assert float(d.abs().max()) <= w / 2 and float(d.std()) > 0.6 * w / 12 ** 0.5
    assert not torch.equal(d[0], d[1])  # a draw per value, not one image for the batch
    assert not torch.equal(after, after_q)  # the draw came from the shared stream
    xq2, _, _ = batch(gan_real_dequantize=w)
    assert torch.equal(xq, xq2)


# --- multi-step generator: backward simulation ---------------------------------------------------------------
def _unrolled(gen, z, c, k):
    """The generator's first k + 1 steps written out by hand with the denoiser: what sampling does."""
    den, sch = gen.denoiser, gen.denoiser.schedule
    zs = z.chunk(len(STEPS), dim=1)
    x, x0 = float(sch.sigma[STEPS[0]]) * zs[0], None
    for j in range(k + 1):
        t = torch.full((z.shape[0],), STEPS[j])
        if j:
            x = sch.alpha[STEPS[j]] * x0 + sch.sigma[STEPS[j]] * zs[j]
        x0 = den(x, t, c)
    return x0


def test_backward_simulation_equals_an_unrolled_sampler(tiny_teacher_dir):
    tr = _trainer(tiny_teacher_dir, generator_timesteps=STEPS, batch_size=6)
    g = tr.m.generator
    assert g.num_steps == 4 and g.noise_shape((1, 8, 8)) == (4, 8, 8)
    ks = set()
    for _ in range(12):
        state = tr.rng.get_state()
        with torch.no_grad():
            x_in, k, c = tr.generator_inputs(6)
            out = tr.run_generator(x_in, k, c)
        tr.rng.set_state(state)  # the same draws, by hand: noise and labels, then the step
        z = torch.randn((6, 4, 8, 8), generator=tr.rng)
        labels = torch.randint(0, 10, (6,), generator=tr.rng)
        assert int(torch.randint(0, 4, (1,), generator=tr.rng)) == k
        with torch.no_grad():
            torch.testing.assert_close(out, _unrolled(g, z, labels, k), rtol=1e-5, atol=1e-5)
            if k == 3:  # the last step's training sample is exactly a full 4-step sample
                torch.testing.assert_close(out, g(z, labels), rtol=1e-5, atol=1e-5)
        ks.add(k)
    assert ks == {0, 1, 2, 3}


def test_multistep_generator_trains(tiny_teacher_dir):
    tr = _gan_trainer(tiny_teacher_dir, generator_timesteps=STEPS, fake_updates_per_generator=2)
    g0 = _clone(tr.m.generator)
    for _ in range(3):
        logs = tr.train_step()
        assert logs["skipped"] == 0.0
    assert not _same(tr.m.generator, g0)


def test_bad_gan_and_step_settings_are_refused(tiny_teacher_dir):
    from engine.config import ConfigError, DMDConfig, parse
    from engine.errors import DMDError
    with pytest.raises(ConfigError, match="generator_timesteps"):
        parse(DMDConfig, {"train": {"generator_timesteps": [249, 999]}})
    with pytest.raises(ConfigError, match="gan_weight_fake"):
        parse(DMDConfig, {"train": {"gan_weight_fake": -1}})
    with pytest.raises(DMDError, match="generator_timesteps"):
        _trainer(tiny_teacher_dir, generator_timesteps=[1500, 10])


def test_gan_with_gradient_checkpointing_matches_without(tiny_teacher_dir):
    """The generator's GAN loss through a gradient-checkpointed fake score (ZeRO-3 configs checkpoint): the fake
    stays frozen through the backward's recompute, and the gradients equal those without checkpointing."""
    grads = []
    for ckpt in (False, True):
        tr = _gan_trainer(tiny_teacher_dir)
        if ckpt:
            tr.m.fake.net.enable_gradient_checkpointing()
            tr.m.generator.denoiser.net.enable_gradient_checkpointing()
        tr.generator_step()
        assert all(p.grad is None for p in tr.m.fake.parameters())
        grads.append([p.grad.clone() for p in tr.m.generator.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_head_keeps_features_only_while_discriminating(tiny_teacher_dir):
    from models.gan import discriminate
    m = _gan_trainer(tiny_teacher_dir).m
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        m.fake(x, t, c)
        assert m.fake.gan_head.taken is None  # an ordinary pass keeps nothing
        a, b = discriminate(m.fake, x, t, c), discriminate(m.fake, x, t, c)
    assert torch.equal(a, b) and m.fake.gan_head.taken is None
    assert len(m.fake.net.mid_block._forward_hooks) == 1  # one hook, not one per call


def test_early_exit_skips_the_up_path_and_changes_nothing(tiny_teacher_dir):
    """The one-process backend ends D's passes at the mid block: the up blocks do not run, yet the logits and
    two whole GAN training steps (both losses, 2 fake updates each) equal those of full forwards."""
    from models.gan import discriminate
    runs = []
    for early in (True, False):
        tr = _gan_trainer(tiny_teacher_dir, fake_updates_per_generator=2)
        head = tr.m.fake.gan_head
        assert head.early_exit  # the one-process backend's choice
        head.early_exit = early
        ran = []
        hook = tr.m.fake.net.up_blocks[-1].register_forward_hook(lambda *a: ran.append(1))
        x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
        logits = discriminate(tr.m.fake, x, t, torch.tensor([1, 2]))
        assert bool(ran) != early and not head.stop
        hook.remove()
        logs = [tr.train_step() for _ in range(2)]
        runs.append((logits, logs, _clone(tr.m.fake), _clone(tr.m.generator)))
    (la, ga, fa, gena), (lb, gb, fb, genb) = runs
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert ga == gb
    for p, q in zip(fa + gena, fb + genb):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_early_exit_on_a_text_unet_gives_the_whole_forwards_logits_and_gradients():
    """UNet2DConditionModel too: the cut happens after its mid block, and D's gradients reach the same weights."""
    from diffusers import UNet2DConditionModel
    from torch import nn
    from models.gan import attach_head, discriminate

    class Wrap(nn.Module):  # the Denoiser's calling convention, enough for the head
        def __init__(self, net):
            super().__init__()
            self.net, self.net_call = net, None

        def forward(self, x, t, cond):
            return self.net(x, t, encoder_hidden_states=cond).sample

    torch.manual_seed(0)
    net = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                               block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                               attention_head_dim=8, norm_num_groups=8)
    d = Wrap(net)
    head = attach_head(d, early_exit=True)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.randn(2, 7, 32)
    out = []
    for early in (True, False):
        head.early_exit = early
        ran = []
        hook = net.up_blocks[-1].register_forward_hook(lambda *a: ran.append(1))
        d.zero_grad(set_to_none=True)
        logits = discriminate(d, x, t, c)
        logits.sum().backward()
        hook.remove()
        assert bool(ran) != early
        out.append((logits.detach(), {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = out
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert ga.keys() == gb.keys() and not any(k.startswith("net.up_blocks") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-6, atol=1e-8)
