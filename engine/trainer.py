"""Per-step DMD maths (paper Algorithm 1). The models come from engine.builder.DMDModels (one process) or
engine.zero.ZeroDMDModels (DeepSpeed ZeRO-3); the update mechanics (backward, step, discard, cross-process
means, the per-process batch slice) are methods of those, so this file holds only the maths.

One iteration: generator update with L = dm_weight * L_DM + reg_weight * L_reg, then
`fake_updates_per_generator` fake-score updates (the first on the generator update's own samples).
"""
from __future__ import annotations

import math

import torch

from .cli import DMDError
from .losses import denoising_loss, distribution_matching_loss


class DMDTrainer:
    def __init__(self, models, tc, regression=None, pairs=None, seed: int = 0):
        self.m, self.tc, self.regression, self.pairs = models, tc, regression, pairs
        self.rng = torch.Generator().manual_seed(seed)  # CPU stream for z, labels, t and eps: reproducible
        self.step = 0
        self.skips_in_row = self.skipped_total = 0
        self.nan_steps = ()  # test hook (engine/train.py reads DMD_TEST_NAN_AT_STEP): steps whose loss is poisoned
        self.kernels = self._kernels(getattr(tc, "kernels", "eager"))
        self.gen = models.generator
        self.compiled_nets = []
        if getattr(tc, "compile", False):
            from .compile import CompiledModule, compile_denoiser_net
            mode, scope = getattr(tc, "compile_mode", "auto"), getattr(tc, "compile_scope", "generator")
            if scope not in ("generator", "all"):
                raise DMDError(f"train.compile_scope must be generator or all, got '{scope}'")
            self.gen = CompiledModule(models.generator, mode, models.device)
            if scope == "all" and hasattr(models.teacher, "net"):  # the toy's analytic teacher has no network
                self.compiled_nets = [compile_denoiser_net(models.teacher, "teacher", mode, models.device),
                                      compile_denoiser_net(models.fake, "fake score", mode, models.device)]

    def _kernels(self, choice: str):
        """kernels.dmd and kernels.noise when selected and runnable here, else None (engine.losses, eager)."""
        if choice not in ("auto", "eager", "triton"):
            raise DMDError(f"train.kernels must be auto, eager or triton, got '{choice}'")
        if choice == "eager" or (choice == "auto" and self.m.device.type != "cuda"):
            return None
        try:
            from kernels import dmd, noise, runs_triton
        except ImportError as e:
            if choice == "auto":
                return None
            raise DMDError(f"train.kernels='triton' needs the triton package ({e})") from None
        probe = torch.empty(0, device=self.m.device)
        if not runs_triton(dmd._dmd_stats_kernel, probe):
            raise DMDError("train.kernels='triton' needs a CUDA device, or TRITON_INTERPRET=1 in the environment "
                           "for Triton's (slow) CPU interpreter")
        return dmd, noise

    # --- random inputs ----------------------------------------------------------------------------
    # Every process draws the whole global batch from the shared stream and keeps its own slice
    # (models.local), so N processes train on exactly the samples one process would.
    def noise(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn((n, *self.m.sample_shape), generator=self.rng)
        nc = self.m.num_classes
        cond = torch.randint(0, nc, (n,), generator=self.rng) if nc else None
        z, cond = self.m.local(z), self.m.condition(self.m.local(cond))  # text models: indices -> embeddings
        dev = self.m.device
        return z.to(dev), (cond.to(dev) if cond is not None else None)

    def _t_eps(self, like: torch.Tensor):
        sch = self.m.teacher.schedule
        n = like.shape[0] * self.m.world_size
        t = self.m.local(sch.sample_t(n, self.tc.min_t_frac, self.tc.max_t_frac, self.rng)).to(like.device)
        eps = self.m.local(torch.randn((n, *like.shape[1:]), generator=self.rng)).to(like)
        return t, eps

    # --- the two updates --------------------------------------------------------------------------
    def generator_step(self, ref=None) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        tc, m = self.tc, self.m
        z, cond = self.noise(tc.batch_size)
        if self.gen is not m.generator:
            self.gen.step_begin()
        x = self.gen(z, cond)
        loss = x.new_zeros(())
        logs = {}
        if tc.dm_weight > 0:
            t, eps = self._t_eps(x)
            if self.kernels:
                # eps still comes from the CPU stream, so a run is the same draw for draw as an eager one
                x_t = self.kernels[1].add_noise(x.detach(), t, *m.teacher.schedule.tables(x.device)[:2], eps=eps)
            else:
                x_t = m.teacher.schedule.add_noise(x.detach(), eps, t)
            with torch.no_grad():
                pred_real = m.teacher.guided(x_t, t, cond, tc.real_guidance)
                # "none" = the real score alone (Fig. 3): the fake score is replaced by the sample itself,
                # the zero-mean part of a delta's score, so only mode seeking towards mu_real remains.
                pred_fake = m.fake(x_t, t, cond) if tc.fake_score == "learned" else x.detach()
            dm_loss = self.kernels[0].dmd_loss if self.kernels else distribution_matching_loss
            l_dm = dm_loss(x, pred_real, pred_fake)
            loss = loss + tc.dm_weight * l_dm
            logs["loss_dm"] = l_dm.item()
        if tc.reg_weight > 0 and ref is not None:
            z_ref, y_ref, c_ref = ref
            x_ref = self.gen(z_ref, c_ref)
            l_reg = self.regression(x_ref, y_ref).mean()
            loss = loss + tc.reg_weight * l_reg
            logs["loss_reg"] = l_reg.item()
        if self.step in self.nan_steps:
            loss = loss * float("nan")
        logs["grad_norm_g"] = m.backward("generator", loss)  # applied or dropped by train_step
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
        gn = m.backward("fake", loss)  # applied or dropped by the caller
        return {"loss_fake": loss.item(), "grad_norm_f": gn}

    def _apply_if_finite(self, logs: dict, names) -> tuple[dict, bool]:
        """Averages the logs over processes; applies the pending updates of `names` only if every loss and
        gradient norm is finite, else drops them. Every process reaches the same verdict (same averages)."""
        logs = self.m.mean_over_ranks(logs)
        ok = all(math.isfinite(v) for v in logs.values())
        for name in names:
            self.m.step(name) if ok else self.m.discard(name)
        return logs, ok

    def train_step(self, ref=None) -> dict:
        """One generator update and its fake-score updates; returns scalars for the log.

        Non-finite guard: the generator update and the first fake update are applied together or not at all
        (logs["skipped"] = 1). Deferring the generator's update past the first fake update changes nothing:
        that fake update trains on the generator's samples drawn before its update, as in Algorithm 1.
        Further two-time-scale fake updates (on fresh samples of the updated generator) are guarded one by one.
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
        if learned and ok:
            for _ in range(1, tc.fake_updates_per_generator):
                more, ok = self._apply_if_finite(self.fake_step(), ["fake"])
                if not ok:
                    break
                logs.update(more)
        logs["skipped"] = 0.0 if ok else 1.0
        self.skips_in_row = 0 if ok else self.skips_in_row + 1
        self.skipped_total += 0 if ok else 1
        self.step += 1
        return logs

    def warmup_fake(self, steps: int, progress=None):
        for _ in range(steps):
            self._apply_if_finite(self.fake_step(), ["fake"])
            if progress is not None:
                progress.update(1)
