"""One denoiser interface for every teacher: x0 = mu(x_t, t, cond), whatever the network predicts.

A model folder is laid out as diffusers lays out a pipeline, so stock diffusers can read its parts:
    unet/        UNet2DModel (class labels) or UNet2DConditionModel (text), config.json + safetensors
    scheduler/   scheduler_config.json: DDPM-like (vp) or EDMEulerScheduler (edm)
    dmd_model.json   what diffusers does not record: number of classes, the null class used for guidance,
                     the sample shape and (for a distilled generator) its fixed timestep.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .schedules import NoiseSchedule

EDM_SCHEDULERS = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}


class ModelFolderError(ValueError):
    """A model folder is missing or does not hold what the engine needs."""


class Denoiser(nn.Module):
    """Wraps a network that predicts epsilon, v, x0 (vp) or EDM's F (edm) and returns x0."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 num_classes: int | None = None, null_class: int | None = None, sample_shape=None,
                 cond_kwarg: str = "class_labels"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got '{prediction_type}'")
        self.net, self.schedule, self.prediction_type = net, schedule, prediction_type
        self.num_classes, self.null_class = num_classes, null_class
        self.sample_shape = tuple(sample_shape) if sample_shape else None
        self.cond_kwarg = cond_kwarg
        self.null_cond = None  # text models: the empty prompt's embedding (1, L, D), the unconditional input
        self.net_call = None  # optional stand-in for self.net's __call__ (e.g. a compiled one); same weights

    def _net(self, x, time, cond):
        kw = {} if cond is None else {self.cond_kwarg: cond}
        out = (self.net_call or self.net)(x, time, **kw)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        sch = self.schedule
        a, s = sch.coeffs(t, x_t)
        time = sch.time_input(t).to(x_t.device)
        if sch.kind == "edm":
            sd = sch.sigma_data
            c_in = 1 / (s ** 2 + sd ** 2).sqrt()  # EDM Table 1 preconditioning
            c_skip = sd ** 2 / (s ** 2 + sd ** 2)
            c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
            if self.prediction_type == "v_prediction":
                c_out = -c_out
            return c_skip * x_t + c_out * self._net(c_in * x_t, time, cond).to(x_t.dtype)
        out = self._net(x_t, time, cond).to(x_t.dtype)
        if self.prediction_type == "epsilon":
            return (x_t - s * out) / a
        if self.prediction_type == "v_prediction":
            return (a * x_t - s * out) / (a * a + s * s)
        return out

    def guided(self, x_t, t, cond, scale: float = 1.0):
        """Classifier-free guidance in x0 space: mu_u + scale * (mu_c - mu_u); one batched forward. The
        unconditional input is the null class for labels, the empty prompt's embedding for text."""
        if scale == 1.0 or cond is None:
            return self(x_t, t, cond)
        if cond.is_floating_point():  # text embeddings
            if self.null_cond is None:
                raise ValueError("guidance scale != 1 on a text model needs null_cond (the empty prompt's embedding)")
            null = self.null_cond.to(cond).expand_as(cond)
        elif self.null_class is None:
            raise ValueError("guidance scale != 1 needs a model trained with a null class (dmd_model.json: null_class)")
        else:
            null = torch.full_like(cond, self.null_class)
        both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        mu_c, mu_u = both.chunk(2)
        return mu_u + scale * (mu_c - mu_u)

    def init_noise(self, z: torch.Tensor) -> torch.Tensor:
        """x_T for unit noise z: sigma_{T-1} * z (the signal term alpha_{T-1} * x0 is dropped)."""
        return self.schedule.sigma_last * z

    # --- diffusers folders ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype=torch.float32, weights: bool = True) -> "Denoiser":
        """weights=False builds the network from its config only (random init), for callers that load the
        weights themselves, e.g. into parameters already partitioned across processes."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"model folder '{folder}' not found (expected unet/ and scheduler/ inside)")
        for part in ("unet/config.json", "scheduler/scheduler_config.json"):
            if not (folder / part).is_file():
                raise ModelFolderError(f"model folder '{folder}' has no {part}")
        sch_cfg, unet_cfg = _read_json(folder / "scheduler/scheduler_config.json"), _read_json(folder / "unet/config.json")
        meta = _read_json(folder / "dmd_model.json") if (folder / "dmd_model.json").is_file() else {}
        schedule = schedule_from_scheduler_config(sch_cfg)
        import diffusers
        cls_name = unet_cfg.get("_class_name", "UNet2DModel")
        if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
            raise ModelFolderError(f"{folder}/unet/config.json: unsupported _class_name '{cls_name}'")
        try:
            if weights:
                net = getattr(diffusers, cls_name).from_pretrained(folder / "unet", torch_dtype=dtype,
                                                                   low_cpu_mem_usage=False)
            else:
                net = getattr(diffusers, cls_name).from_config(unet_cfg)
                net = net if dtype == torch.float32 else net.to(dtype)
        except (OSError, ValueError, KeyError) as e:  # how diffusers and safetensors report a corrupt or foreign folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFolderError(f"{folder}/unet cannot be loaded ({type(e).__name__}: {first[:200]})") from None
        kw = "class_labels" if cls_name == "UNet2DModel" else "encoder_hidden_states"
        shape = meta.get("sample_shape") or [unet_cfg["in_channels"], unet_cfg["sample_size"], unet_cfg["sample_size"]]
        return cls(net, schedule, sch_cfg.get("prediction_type", "epsilon"), meta.get("num_classes"),
                   meta.get("null_class"), shape, kw)

    def save_pretrained(self, folder: str | Path, extra_meta: dict | None = None, state_dict: dict | None = None):
        """state_dict: the network's weights when self.net does not hold them (e.g. gathered from shards)."""
        folder = Path(folder)
        if state_dict is None:
            self.net.save_pretrained(folder / "unet", safe_serialization=True)
        else:
            from safetensors.torch import save_file
            self.net.save_config(folder / "unet")
            save_file({k: v.contiguous() for k, v in state_dict.items()},
                      str(folder / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        scheduler_from_schedule(self.schedule, self.prediction_type).save_pretrained(folder / "scheduler")
        meta = {"num_classes": self.num_classes, "null_class": self.null_class,
                "sample_shape": list(self.sample_shape) if self.sample_shape else None, **(extra_meta or {})}
        (folder / "dmd_model.json").write_text(json.dumps(meta, indent=2))


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelFolderError(f"{path} must hold a JSON object")
    return d


class OneStepGenerator(nn.Module):
    """G(z, c): the teacher's network run at fixed timesteps (DMD Sec. 3.1; DMD2 Sec. 4.5 for several).

    One step (the default): G(z, c) = mu_G(sigma_{T-1} z, T-1, c). Several steps t_0 > t_1 > ... (DMD2's
    [999, 749, 499, 249]): x0 = mu_G(sigma_{t_0} z_0, t_0); then at each later t_k the prediction is noised
    again with fresh unit noise z_k, x_{t_k} = alpha_{t_k} x0 + sigma_{t_k} z_k, and denoised once more. All the
    noise is one input, z of shape (B, K*C, H, W) (`noise_shape`), chunk k = z_k, so a K-step sample is a pure
    function of its input (seeded draws, compiled and CUDA-graphed sampling work unchanged).
    """

    def __init__(self, denoiser: Denoiser, timestep: int | None = None, timesteps=None):
        super().__init__()
        self.denoiser = denoiser
        T = denoiser.schedule.T
        steps = [int(t) for t in timesteps] if timesteps else [T - 1 if timestep is None else int(timestep)]
        if any(not 0 <= t < T for t in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"generator timesteps must be decreasing integers in [0, {T}), got {steps}")
        self.timesteps = steps
        self.timestep = steps[0]  # the one-step generator's timestep (older code and files name it so)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def noise_shape(self, sample_shape) -> tuple:
        """The unit noise one sample takes: the sample's shape, channels times the number of steps."""
        c, *rest = sample_shape
        return (c * self.num_steps, *rest)

    def start(self, z0: torch.Tensor) -> torch.Tensor:
        """x_{t_0} for unit noise z0 (the signal term alpha_{t_0} x0 is dropped: pure noise, as at t = T-1)."""
        if self.timesteps[0] == self.denoiser.schedule.T - 1:
            return self.denoiser.init_noise(z0)
        return float(self.denoiser.schedule.sigma[self.timesteps[0]]) * z0

    def denoise(self, x_t: torch.Tensor, k: int, cond=None) -> torch.Tensor:
        """Step k: the x0 prediction from x_{t_k}."""
        t = torch.full((x_t.shape[0],), self.timesteps[k], dtype=torch.long, device=x_t.device)
        return self.denoiser(x_t, t, cond)

    def renoise(self, x0: torch.Tensor, zk: torch.Tensor, k: int) -> torch.Tensor:
        """x_{t_k} = alpha_{t_k} x0 + sigma_{t_k} zk: the input of step k >= 1."""
        t = torch.full((x0.shape[0],), self.timesteps[k], dtype=torch.long, device=x0.device)
        return self.denoiser.schedule.add_noise(x0, zk.to(x0), t)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        want = self.num_steps * self.denoiser.net.config.in_channels
        if z.shape[1] != want:
            raise ValueError(f"a {self.num_steps}-step generator takes noise of {want} channels (its steps' draws "
                             f"stacked), got {z.shape[1]}")
        zs = z.chunk(self.num_steps, dim=1) if self.num_steps > 1 else (z,)
        x0 = self.denoise(self.start(zs[0]), 0, cond)
        for k in range(1, self.num_steps):
            x0 = self.denoise(self.renoise(x0, zs[k], k), k, cond)
        return x0

    def save_pretrained(self, folder, state_dict: dict | None = None):
        """state_dict: the denoiser network's weights (keys as in self.denoiser.net), when not held here."""
        self.denoiser.save_pretrained(folder, {"one_step_timestep": self.timestep, "timesteps": self.timesteps},
                                      state_dict)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32):
        d = Denoiser.from_pretrained(folder, dtype)
        meta = json.loads((Path(folder) / "dmd_model.json").read_text()) if (Path(folder) / "dmd_model.json").is_file() else {}
        return cls(d, meta.get("one_step_timestep"), meta.get("timesteps"))


def trainable_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    m.requires_grad_(True).train()
    return m


def schedule_from_scheduler_config(cfg: dict) -> NoiseSchedule:
    name = cfg.get("_class_name", "DDPMScheduler")
    T = int(cfg.get("num_train_timesteps", 1000))
    if name in EDM_SCHEDULERS:
        return NoiseSchedule.edm(T, cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0), cfg.get("rho", 7.0),
                                 cfg.get("sigma_data", 0.5))
    return NoiseSchedule.vp(T, cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02),
                            cfg.get("beta_schedule", "linear"))


def scheduler_from_schedule(schedule: NoiseSchedule, prediction_type: str):
    from diffusers import DDPMScheduler, EDMEulerScheduler
    if schedule.kind == "edm":
        return EDMEulerScheduler(**schedule.params, prediction_type=prediction_type)
    return DDPMScheduler(**schedule.params, prediction_type=prediction_type)


def weights_hash(folder: str | Path) -> str:
    """sha256 over the folder's weight files (sorted), to tie derived data to exact teacher weights."""
    if not Path(folder).is_dir():
        raise ModelFolderError(f"model folder '{folder}' not found")
    h = hashlib.sha256()
    files = sorted(Path(folder).rglob("*.safetensors")) + sorted(Path(folder).rglob("*.bin"))
    if not files:
        raise ModelFolderError(f"model folder '{folder}' holds no weight files")
    for f in files:
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
