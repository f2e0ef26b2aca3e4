"""Per-step DMD maths (paper Algorithm 1). The models and optimisers come from engine.builder.DMDModels.

One iteration: generator update with L = dm_weight * L_DM + reg_weight * L_reg, then
`fake_updates_per_generator` fake-score updates (the first on the generator update's own samples).
"""
from __future__ import annotations

import torch

from .losses import denoising_loss, distribution_matching_loss


def _clip(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.detach().norm() for p in params]))) if params else 0.0


class DMDTrainer:
    def __init__(self, models, tc, regression=None, pairs=None, seed: int = 0):
        self.m, self.tc, self.regression, self.pairs = models, tc, regression, pairs
        self.rng = torch.Generator().manual_seed(seed)  # CPU stream for z, labels, t and eps: reproducible
        self.step = 0

    # --- random inputs ----------------------------------------------------------------------------
    def noise(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn((n, *self.m.sample_shape), generator=self.rng)
        nc = self.m.num_classes
        cond = torch.randint(0, nc, (n,), generator=self.rng) if nc else None
        dev = self.m.device
        return z.to(dev), (cond.to(dev) if cond is not None else None)

    def _t_eps(self, like: torch.Tensor):
        sch = self.m.teacher.schedule
        t = sch.sample_t(like.shape[0], self.tc.min_t_frac, self.tc.max_t_frac, self.rng).to(like.device)
        eps = torch.randn(like.shape, generator=self.rng).to(like)
        return t, eps

    # --- the two updates --------------------------------------------------------------------------
    def generator_step(self, ref=None) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        tc, m = self.tc, self.m
        z, cond = self.noise(tc.batch_size)
        x = m.generator(z, cond)
        loss = x.new_zeros(())
        logs = {}
        if tc.dm_weight > 0:
            t, eps = self._t_eps(x)
            x_t = m.teacher.schedule.add_noise(x.detach(), eps, t)
            with torch.no_grad():
                pred_real = m.teacher.guided(x_t, t, cond, tc.real_guidance)
                # "none" = the real score alone (Fig. 3): the fake score is replaced by the sample itself,
                # the zero-mean part of a delta's score, so only mode seeking towards mu_real remains.
                pred_fake = m.fake(x_t, t, cond) if tc.fake_score == "learned" else x.detach()
            l_dm = distribution_matching_loss(x, pred_real, pred_fake)
            loss = loss + tc.dm_weight * l_dm
            logs["loss_dm"] = l_dm.item()
        if tc.reg_weight > 0 and ref is not None:
            z_ref, y_ref, c_ref = ref
            x_ref = m.generator(z_ref, c_ref)
            l_reg = self.regression(x_ref, y_ref).mean()
            loss = loss + tc.reg_weight * l_reg
            logs["loss_reg"] = l_reg.item()
        m.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm_g"] = _clip(m.generator.parameters(), tc.grad_clip)
        m.opt_g.step()
        m.update_ema()
        logs["loss_g"] = loss.item()
        return logs, x.detach(), cond

    def fake_step(self, x: torch.Tensor | None = None, cond=None) -> dict:
        tc, m = self.tc, self.m
        if x is None:
            z, cond = self.noise(tc.batch_size)
            with torch.no_grad():
                x = m.generator(z, cond)
        t, eps = self._t_eps(x)
        loss = denoising_loss(m.fake, x, t, eps, cond, tc.fake_loss_weighting).mean()
        m.opt_f.zero_grad(set_to_none=True)
        loss.backward()
        gn = _clip(m.fake.parameters(), tc.grad_clip)
        m.opt_f.step()
        return {"loss_fake": loss.item(), "grad_norm_f": gn}

    def train_step(self, ref=None) -> dict:
        """One generator update and its fake-score updates; returns scalars for the log."""
        tc = self.tc
        logs = {}
        x = cond = None
        if tc.dm_weight > 0 or tc.reg_weight > 0:
            logs, x, cond = self.generator_step(ref)
        if tc.dm_weight > 0 and tc.fake_score == "learned":
            for k in range(tc.fake_updates_per_generator):
                logs.update(self.fake_step(x if k == 0 else None, cond if k == 0 else None))
        self.step += 1
        return logs

    def warmup_fake(self, steps: int, progress=None):
        for _ in range(steps):
            self.fake_step()
            if progress is not None:
                progress.update(1)
