"""Per-step DMD maths (paper Algorithm 1). The models come from a backend (engine/backend.py: plain PyTorch or
DeepSpeed ZeRO-3); the update mechanics (backward, step, discard, cross-process means, the per-process batch
slice) are its methods, so this file holds only the maths.

One iteration: generator update with L = dm_weight * L_DM + reg_weight * L_reg (+ gan_weight_generator *
L_GAN, DMD2), then `fake_updates_per_generator` fake-score updates (the first on the generator update's own
samples), each its denoising loss (+ gan_weight_fake * the discriminator's loss on generated and real data).

A generator of several steps (train.generator_timesteps) is trained with DMD2's backward simulation: each
update picks one step k for the batch, makes that step's input by running the current generator from noise
through steps 0..k-1 without gradients (re-noising each prediction with fresh noise, as sampling does), and
trains the generator's step-k prediction.
"""
from __future__ import annotations

import contextlib
import math

import torch

from models.gan import discriminate, discriminator_loss, generator_gan_loss

from . import hotpath
from .backend import frozen
from .errors import DMDError
from .losses import denoising_loss


class DMDTrainer:
    def __init__(self, models, tc, regression=None, pairs=None, seed: int = 0):
        self.m, self.tc, self.regression, self.pairs = models, tc, regression, pairs
        self.rng = torch.Generator().manual_seed(seed)  # CPU stream for z, labels, t and eps: reproducible
        self.real = None  # DMD2's real-data feed for the discriminator: .next() -> (x, labels or captions)
        self.step = 0
        self.skips_in_row = self.skipped_total = 0
        self.nan_steps = ()  # steps whose loss is poisoned: fault injection for tests (engine/faults.py)
        self.ops = hotpath.select(getattr(tc, "kernels", "eager"), models.device)
        self.gen = models.generator
        self.compiled_nets = []
        if getattr(tc, "compile", False):
            from .compile import CompiledModule, compile_denoiser_net
            mode, scope = getattr(tc, "compile_mode", "auto"), getattr(tc, "compile_scope", "generator")
            if scope not in ("generator", "all"):
                raise DMDError(f"train.compile_scope must be generator or all, got '{scope}'")
            self.gen = CompiledModule(models.generator, mode, models.device)
            if scope == "all" and models.kind.folder:  # the toy's teacher is analytic: no network to compile
                self.compiled_nets = [compile_denoiser_net(models.teacher, "teacher", mode, models.device),
                                      compile_denoiser_net(models.fake, "fake score", mode, models.device)]

    # --- random inputs ----------------------------------------------------------------------------
    # Every process draws the whole global batch from the shared stream and keeps its own slice
    # (models.local), so N processes train on exactly the samples one process would. Everything a step
    # draws is drawn before its micro-batches run, so the draws do not depend on train.micro_batch_size.
    def noise(self, n: int, shape=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn((n, *(shape or self.m.sample_shape)), generator=self.rng)
        nc = self.m.num_classes
        cond = torch.randint(0, nc, (n,), generator=self.rng) if nc else None
        z, cond = self.m.local(z), self.m.condition(self.m.local(cond))  # text models: indices -> embeddings
        dev = self.m.device
        return z.to(dev), (cond.to(dev) if cond is not None else None)

    def _t_eps(self, n_local: int, use: str = "dm"):
        """t and unit noise for a per-process batch, t in the range of `use`: "dm" (the DM loss), "fake" (the fake
        score's denoising, train.fake_t_range) or "gan" (Diffusion-GAN's band; DMD2: [0, T))."""
        tc = self.tc
        lo, hi = {"gan": (tc.gan_min_t_frac, tc.gan_max_t_frac),
                  "fake": (0.0, 1.0) if tc.fake_t_range == "all" else (tc.min_t_frac, tc.max_t_frac),
                  "dm": (tc.min_t_frac, tc.max_t_frac)}[use]
        n = n_local * self.m.world_size
        t = self.m.local(self.m.teacher.schedule.sample_t(n, lo, hi, self.rng)).to(self.m.device)
        eps = self.m.local(torch.randn((n, *self.m.sample_shape), generator=self.rng)).to(self.m.device)
        return t, eps

    # --- the generator's inputs: noise for one step, backward simulation for several -----------------------
    def generator_inputs(self, n: int):
        """(inputs, k, cond) for a global batch of n: one step: unit noise z and k = None (the generator's own
        forward); several: k drawn for the batch and x_{t_k} made by the current generator, no gradients."""
        steps = getattr(self.m.generator, "num_steps", 1)
        if steps == 1:
            z, cond = self.noise(n)
            return z, None, cond
        z, cond = self.noise(n, self.m.generator.noise_shape(self.m.sample_shape))
        k = int(torch.randint(0, steps, (1,), generator=self.rng))
        return self.simulate(z, k, cond), k, cond

    @torch.no_grad()
    def simulate(self, z: torch.Tensor, k: int, cond) -> torch.Tensor:
        """x_{t_k}: the generator's steps 0..k-1 from the noise chunks of z, each prediction re-noised with the
        next chunk (exactly what sampling with the first k + 1 timesteps feeds its last step)."""
        g = self.m.generator
        zs = z.chunk(g.num_steps, dim=1)
        out = []
        for sl, _ in self._micro(z.shape[0]):
            c, x = _take(cond, sl), g.start(zs[0][sl])
            for j in range(k):
                x = g.renoise(g.denoise(x, j, c), zs[j + 1][sl], j + 1)
            out.append(x)
        return torch.cat(out)

    def run_generator(self, inputs, k, c):
        return self.gen(inputs, c) if k is None else self.m.generator.denoise(inputs, k, c)

    # --- DMD2's GAN (models/gan.py) -----------------------------------------------------------------------
    def real_batch(self):
        """This process's slice of a global batch of real data and its condition (labels, or captions embedded)."""
        if self.real is None:
            raise DMDError("train.gan_weight_fake > 0 needs real data: set data.real_data")
        x, cond = self.real.next()
        width = getattr(self.tc, "gan_real_dequantize", 0.0)
        if width > 0:  # the whole global batch's draw from the shared stream, as noise() does
            u = torch.rand((x.shape[0] * self.m.world_size, *x.shape[1:]), generator=self.rng)
            x = x + (self.m.local(u) - 0.5).to(x) * width
        if isinstance(cond, (list, tuple)):  # captions
            cond = self.m.text.encoder(list(cond))
        elif cond is not None and self.m.num_classes is None:
            cond = None
        return x.to(self.m.device), (cond.to(self.m.device) if cond is not None else None)

    def _micro(self, n: int):
        """(slice, share of the whole) per micro-batch of a per-process batch of n: each micro-batch's mean loss
        weighted by its share sums to the whole batch's mean, so accumulating them gives the same update."""
        size = self.tc.micro_batch_size or n
        return [(slice(i, min(i + size, n)), (min(i + size, n) - i) / n) for i in range(0, n, size)]

    # --- the two updates --------------------------------------------------------------------------
    def generator_step(self, ref=None) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        tc, m = self.tc, self.m
        inputs, k, cond = self.generator_inputs(tc.batch_size)
        n = inputs.shape[0]
        poison = float("nan") if self.step in self.nan_steps else 1.0
        logs, xs, l_dm, l_reg, l_gan = {}, [], inputs.new_zeros(()), inputs.new_zeros(()), inputs.new_zeros(())
        gan = tc.gan_weight_generator > 0
        if tc.dm_weight > 0:
            t, eps = self._t_eps(n)
        if gan:
            t_g, eps_g = self._t_eps(n, "gan")
        for sl, share in self._micro(n):
            c = _take(cond, sl)
            if self.gen is not m.generator:
                self.gen.step_begin()
            x = self.run_generator(inputs[sl], k, c)
            # a CUDA-graphed generator's output is overwritten by its next replay: keep a copy
            xs.append(x.detach().clone() if self.gen is not m.generator else x.detach())
            loss = None
            if tc.dm_weight > 0:
                x_t = self.ops.add_noise(x.detach(), t[sl], m.teacher.schedule, eps[sl].to(x))
                with torch.no_grad():
                    pred_real = m.teacher.guided(x_t, t[sl], c, tc.real_guidance)
                    # "none" = the real score alone (Fig. 3): the fake score is replaced by the sample itself,
                    # the zero-mean part of a delta's score, so only mode seeking towards mu_real remains.
                    pred_fake = m.fake(x_t, t[sl], c) if tc.fake_score == "learned" else x.detach()
                part = self.ops.dm_loss(x, pred_real, pred_fake) * share
                loss = part * tc.dm_weight
                l_dm = l_dm + part.detach()
            # the GAN loss passes through the fake score and its head, which must not move (they are the
            # discriminator): frozen through the backward too, whose checkpointed recompute must see them as
            # the forward did
            with frozen(m.fake) if gan else contextlib.nullcontext():
                if gan:
                    x_g = m.teacher.schedule.add_noise(x, eps_g[sl].to(x), t_g[sl])
                    part = generator_gan_loss(discriminate(m.fake, x_g, t_g[sl], c)).mean() * share
                    loss = part * tc.gan_weight_generator if loss is None else loss + part * tc.gan_weight_generator
                    l_gan = l_gan + part.detach()
                if loss is not None:
                    m.backward("generator", loss * poison)
        if tc.dm_weight > 0:
            logs["loss_dm"] = l_dm
        if gan:
            logs["loss_gan_g"] = l_gan
        if tc.reg_weight > 0 and ref is not None:
            z_ref, y_ref, c_ref = ref
            for sl, share in self._micro(z_ref.shape[0]):
                part = self.regression(self.gen(z_ref[sl], _take(c_ref, sl)), y_ref[sl]).mean() * share
                m.backward("generator", part * (tc.reg_weight * poison))
                l_reg = l_reg + part.detach()
            logs["loss_reg"] = l_reg
        logs["grad_norm_g"] = m.grad_norm("generator")  # applied or dropped by train_step
        logs["loss_g"] = (tc.dm_weight * l_dm + tc.reg_weight * l_reg + tc.gan_weight_generator * l_gan) * poison
        return logs, torch.cat(xs), cond

    def fake_step(self, x: torch.Tensor | None = None, cond=None) -> dict:
        tc, m = self.tc, self.m
        if x is None:
            inputs, k, cond = self.generator_inputs(tc.batch_size)
            gen = m.generator if k is None else (lambda v, c: m.generator.denoise(v, k, c))
            with torch.no_grad():
                x = torch.cat([gen(inputs[sl], _take(cond, sl)) for sl, _ in self._micro(inputs.shape[0])])
        n = x.shape[0]
        t, eps = self._t_eps(n, "fake")
        gan = tc.gan_weight_fake > 0
        if gan:
            x_real, c_real = self.real_batch()
            if x_real.shape != x.shape:
                raise DMDError(f"real data batch {list(x_real.shape)} does not match the generated batch "
                               f"{list(x.shape)}: data.real_data must hold samples of the teacher's shape")
            t_f, eps_f = self._t_eps(n, "gan")
            t_r, eps_r = self._t_eps(n, "gan")
        total, l_d, d_real, d_fake = (x.new_zeros((), dtype=torch.float32) for _ in range(4))
        for sl, share in self._micro(n):
            c = _take(cond, sl)
            part = denoising_loss(m.fake, x[sl], t[sl], eps[sl].to(x), c, tc.fake_loss_weighting)
            part = part.mean() * share
            loss = part
            if gan:  # Diffusion-GAN: both batches noised (t in the GAN's band) before the fake score sees them
                sch = m.teacher.schedule
                lf = discriminate(m.fake, sch.add_noise(x[sl].detach(), eps_f[sl].to(x), t_f[sl]), t_f[sl], c)
                xr = x_real[sl].to(x)
                lr = discriminate(m.fake, sch.add_noise(xr, eps_r[sl].to(xr), t_r[sl]), t_r[sl], _take(c_real, sl))
                part_d = discriminator_loss(lf, lr).mean() * share
                loss = loss + part_d * tc.gan_weight_fake
                l_d = l_d + part_d.detach()
                d_real = d_real + torch.sigmoid(lr.detach()).mean() * share
                d_fake = d_fake + torch.sigmoid(lf.detach()).mean() * share
            m.backward("fake", loss)  # applied or dropped by the caller
            total = total + part.detach()
        logs = {"loss_fake": total, "grad_norm_f": m.grad_norm("fake")}
        if gan:  # D's mean probability of "real" on each batch: 0.5 and 0.5 is a discriminator that gave up
            logs.update(loss_gan_d=l_d, d_real=d_real, d_fake=d_fake)
        return logs

    def _apply_if_finite(self, logs: dict, names) -> tuple[dict, bool]:
        """Averages the logs over processes; applies the pending updates of `names` only if every loss and
        gradient norm is finite, else drops them. Every process reaches the same verdict (same averages)."""
        logs = self.m.mean_over_ranks(host_floats(logs))
        ok = all(math.isfinite(v) for v in logs.values())
        for name in names:
            self.m.step(name) if ok else self.m.discard(name)
        return logs, ok

    def train_step(self, ref=None) -> dict:
        with self.m.autocast():  # the backend's precision (bf16 models meet fp32 inputs only under autocast)
            return self._train_step(ref)

    def _train_step(self, ref=None) -> dict:
        """One generator update and its fake-score updates; returns scalars for the log.

        Non-finite guard: the generator update and the first fake update are applied together or not at all
        (logs["skipped"] = 1). Deferring the generator's update past the first fake update changes nothing:
        that fake update trains on the generator's samples drawn before its update, as in Algorithm 1.
        Further two-time-scale fake updates (on fresh samples of the updated generator) are guarded one by one;
        a dropped one is counted in logs["skipped_fake"], and the ones after it are not tried.
        """
        tc = self.tc
        logs, pending = {}, []
        x = cond = None
        if tc.dm_weight > 0 or tc.reg_weight > 0:
            logs, x, cond = self.generator_step(ref)
            pending.append("generator")
        learned = tc.dm_weight > 0 and tc.fake_score == "learned"
        if learned:
            logs.update(self.fake_step(x, cond))
            pending.append("fake")
        logs, ok = self._apply_if_finite(logs, pending)
        extra_ok = True
        if learned and ok:
            for _ in range(1, tc.fake_updates_per_generator):
                more, extra_ok = self._apply_if_finite(self.fake_step(), ["fake"])
                if not extra_ok:
                    break
                logs.update(more)
        logs["skipped"] = 0.0 if ok else 1.0
        if tc.fake_updates_per_generator > 1 and learned:
            logs["skipped_fake"] = 0.0 if extra_ok else 1.0
        healthy = ok and extra_ok
        self.skips_in_row = 0 if healthy else self.skips_in_row + 1
        self.skipped_total += 0 if ok else 1
        self.step += 1
        return logs

    def warmup_fake(self, steps: int, progress=None):
        for _ in range(steps):
            with self.m.autocast():
                self._apply_if_finite(self.fake_step(), ["fake"])
            if progress is not None:
                progress.update(1)

    # --- checkpointed state: the shared noise stream, this process's torch RNG (dropout), step, skip counts ----
    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "torch_rng": torch.get_rng_state(), "step": self.step,
                "skipped_total": self.skipped_total, "skips_in_row": self.skips_in_row}

    def load_state_dict(self, s: dict):
        self.rng.set_state(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        self.step = s["step"]
        self.skipped_total, self.skips_in_row = s.get("skipped_total", 0), s.get("skips_in_row", 0)


def _take(cond, sl):
    """Rows `sl` of a condition (class labels or text embeddings), or None."""
    return None if cond is None else cond[sl]


def host_floats(logs: dict) -> dict:
    """A step's scalars as Python floats, the device-held ones read in one transfer (one host sync per update,
    not one per scalar)."""
    on_dev = [k for k, v in logs.items() if torch.is_tensor(v)]
    out = {k: float(v) for k, v in logs.items() if k not in on_dev}
    if on_dev:
        vals = torch.stack([logs[k].detach().double().reshape(()) for k in on_dev]).tolist()
        out.update(zip(on_dev, vals))
    return out
