"""Config files: JSON, validated against dataclasses so a typo is one clear line naming the key.

Each entry point has a schema (a dataclass of sections). Defaults live here, documented once, and so do the
values each key accepts (RULES): every value is checked when the config is loaded, before any work.
`--set section.key=value` on any command line overrides a value (the value is parsed as JSON when it can be).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError  # noqa: F401 - callers catch it from here too


# ---------------------------------------------------------------------------------------------------
# DMD distillation (engine/train.py, make_pairs.py, infer.py). Other schemas (e.g. examples/digits/train_teacher.py)
# reuse the sections and `load`.
@dataclass
class ModelSection:
    kind: str = "unet"                # "unet": class-conditional teacher from a diffusers folder; "sd15": latent
                                      # text-to-image (Stable Diffusion folder); "toy2d": analytic 2-D mixture
    teacher: str = ""                 # the teacher's diffusers folder (unet, sd15), relative to the cwd
    decoder: str = ""                 # sd15: autoencoder folder that decodes latents for the regression loss and
                                      # samples ("" = the teacher's vae/; a TAESD folder makes LPIPS cheap)
    toy_hidden: int = 128             # toy2d: width of the MLP generator and fake score
    init_from: str = ""               # a run folder of this teacher: the generator and fake score start from its
                                      # generator/ and fake_score/, no fake-score warm-up (DMD2's second phase;
                                      # engine/warmstart.py)


@dataclass
class DataSection:
    dataset: str = "digits"           # "digits" (scikit-learn, embedded), "toy2d", or "prompts" (sd15)
    resolution: int = 8               # digits: a multiple of 8 (8 is the data's own resolution); sd15: image side
    prompts: str = ""                 # prompts: text file, one prompt per line (conditions, pairs and samples)
    pairs_dir: str = ""               # "" = OUT/pairs; set it to share pairs between runs
    num_pairs: int = 2000             # regression pairs (z, y) made with the teacher's ODE sampler
    pair_sampler: str = "heun"        # "heun" (EDM Alg. 1) or "ddim"
    pair_steps: int = 18              # sampler grid points (heun: 2K-1 network evaluations)
    pair_guidance: float = 1.0        # classifier-free guidance scale used for the pairs
    pair_seed: int = 1_000_000        # pair i uses noise seed pair_seed + i
    shard_size: int = 1000            # pairs per .npy shard
    pair_batch_size: int = 250
    pair_dtype: str = "float32"       # pair storage: "float32", "bfloat16" or "float16" (half the disk; both feeds
                                      # convert back to float32); recorded in the manifest
    loader: str = "auto"              # pairs to the step: "numpy", "dali" (NVIDIA DALI, reads and copies ahead),
                                      # "auto" = dali on CUDA when installed, else numpy (engine/pair_loader.py)
    real_data: str = ""               # real-data folder for the GAN's discriminator (engine/real_data.py): the
                                      # digits training split (assets/digits_real, examples/digits/make_real.py) or
                                      # latents of captioned images (engine/encode_real.py); read with data.loader


@dataclass
class TrainSection:
    batch_size: int = 64              # generator samples per DM step
    reg_batch_size: int = 32          # pairs per regression step
    micro_batch_size: int = 0         # samples per forward per process; batch_size and reg_batch_size stay the
                                      # global batch of one update, accumulated over micro-batches (0 = all at once)
    max_steps: int = 1000
    lr_generator: float = 2e-5
    lr_fake: float = 2e-5
    betas: list = field(default_factory=lambda: [0.0, 0.99])
    weight_decay: float = 0.0
    fake_updates_per_generator: int = 1  # two-time-scale: fake-score updates per generator update (DMD2 uses 5-10)
    fake_warmup_steps: int = 0        # fake-score-only steps before the first generator update
    fake_score: str = "learned"       # "learned" (DMD) or "none" (real score only, the paper's Fig. 3 ablation)
    fake_loss_weighting: str = "native"  # "native" (teacher's own loss) or "x0" (plain ||mu_fake - x||^2)
    grad_clip: float = 10.0           # max global grad norm per model (0 = off)
    ema_decay: float = 0.0            # generator EMA (0 = off); samples and exports use the EMA when on
    dm_weight: float = 1.0            # 0 = ablation "without distribution matching"
    reg_weight: float = 0.25          # lambda_reg (DMD Sec. 3.3); 0 = ablation "without regression"
    regression_loss: str = "lpips"    # "lpips" (images) or "mse" (toy)
    lpips_backbone: str = "pretrained"  # "pretrained" (torch cache) or "random" (tests/demo; printed in results)
    lpips_net: str = "alex"
    lpips_size: int = 64              # images are resized to this before LPIPS
    min_t_frac: float = 0.02          # the DM loss's t ~ U[min_t_frac T, max_t_frac T] (DMD Sec. 3.2)
    max_t_frac: float = 0.98
    fake_t_range: str = "dm"          # the fake score's denoising t: "dm" (the DM loss's range above) or "all"
                                      # ([0, T), as DMD2 trains it)
    dropout: str = "none"             # trained copies' dropout: "none" (p = 0, DMD2; they see what the teacher in
                                      # eval mode sees) or "teacher" (keep the teacher's rates)
    generator_timesteps: list = field(default_factory=list)  # [] = one step at T-1; e.g. [999, 749, 499, 249]:
                                      # a 4-step generator trained with backward simulation (DMD2 Sec. 4.5)
    gan_weight_generator: float = 0.0  # DMD2's GAN (0 = off): the generator's non-saturating loss softplus(-D(G))
    gan_weight_fake: float = 0.0      # the discriminator's loss softplus(D(G)) + softplus(-D(real)), added to the
                                      # fake score's update (D = a head on the fake score's mid-block features)
    gan_min_t_frac: float = 0.0       # the GAN's noise levels t ~ U[gan_min_t_frac T, gan_max_t_frac T] for D's
    gan_max_t_frac: float = 1.0       # real and generated batches and G's loss (t <= T-1; [0, 1] = DMD2's [0, T));
                                      # a floor hides what D should not judge (e.g. the digits' 17 grey levels)
    gan_real_dequantize: float = 0.0  # w: D's real batches get U(-w/2, w/2) noise per value (0 = off); set it to
                                      # the data's quantisation step (digits: 0.125) so D cannot tell real data by
                                      # its lattice (values may then pass [-1, 1] by w/2); needs the GAN
    real_guidance: float = 1.0        # CFG scale of the real score (text models: 3 for FID, 8 for quality)
    seed: int = 0
    log_every: int = 25
    sample_every: int = 250           # sample grid PNG every N steps (0 = off)
    sample_count: int = 0             # images in each of those grids (0 = 16 for text models, 100 otherwise)
    save_every: int = 500             # checkpoint every N steps (0 = only at the end)
    threads: int = 0                  # torch CPU threads (0 = torch's default)
    device: str = "auto"              # one-process engine: "auto" (cuda when available, else cpu), "cuda", "cpu";
                                      # DeepSpeed runs use each rank's LOCAL_RANK device
    max_consecutive_skips: int = 5    # non-finite steps are skipped (not applied); this many in a row stop the run
    kernels: str = "auto"             # DM loss and noise injection: "auto" (Triton on CUDA, eager on CPU), "eager", "triton"
    compile: bool = False             # torch.compile the generator's forward+backward (engine/compile.py)
    compile_mode: str = "auto"        # "auto" = "reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere
    compile_scope: str = "generator"  # "generator", or "all": the teacher's and fake score's networks too


@dataclass
class DeepSpeedSection:
    """engine/zero.py. One process: `python engine/train.py`; several: `deepspeed [--num_gpus N] engine/train.py`."""
    enabled: bool = False             # true: DeepSpeed ZeRO-3 engine (also with one process); false: plain PyTorch
    zero_stage: int = 3               # only 3 (parameters, gradients and optimiser state partitioned)
    backend: str = "auto"             # torch.distributed backend: "auto" = nccl on GPUs, gloo on CPU
    precision: str = "auto"           # both backends: "auto" = bf16 compute + fp32 master weights on GPU, fp32 on
                                      # CPU; "fp32"; "bf16" (also on CPU)
    teacher_dtype: str = "auto"       # frozen teacher's weights, both backends: "auto" = bf16 on GPU, fp32 on CPU;
                                      # "fp32"; "bf16" (with precision bf16, autocast runs its matmuls in bf16 too)
    offload_params: bool = False      # ZeRO-3 parameter partitions in CPU memory
    offload_optimizer: bool = False   # optimiser state and fp32 master weights in CPU memory
    gradient_checkpointing: bool = False  # recompute generator / fake-score activations in backward
    persistence_threshold: int = 0    # parameters with fewer elements stay whole on every rank (DeepSpeed: 1e5)
    lr_warmup_steps: int = 0          # both backends: linear LR warm-up of both optimisers, then constant (0 =
                                      # constant from the start)
    keep_checkpoints: int = 2         # newest complete checkpoints kept in OUT/checkpoints/


@dataclass
class EvalSection:
    num_samples: int = 1800           # samples written to OUT/samples.npz at the end of a run
    teacher_sampler: str = "heun"
    teacher_steps: int = 18
    batch_size: int = 500             # samples per generator call when drawing (sd15: each batch is decoded too)


@dataclass
class DMDConfig:
    name: str = "run"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


# ---------------------------------------------------------------------------------------------------
# What each value may be. A rule is (test, what the value must be); a "section" rule sees the whole section.
def _choice(*opts):
    return (lambda v: v in opts), "one of " + ", ".join(map(str, opts))


POS = (lambda v: v > 0), "> 0"
NONNEG = (lambda v: v >= 0), ">= 0"
FINITE_POS = (lambda v: math.isfinite(v) and v > 0), "finite and > 0"
FINITE_NONNEG = (lambda v: math.isfinite(v) and v >= 0), "finite and >= 0"
FRACTION = (lambda v: 0 <= v <= 1), "in [0, 1]"
DECAY = (lambda v: 0 <= v < 1), "in [0, 1)"
BETAS = (lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                       for b in v)), "two numbers in [0, 1)"
STEPS = (lambda v: all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v)
         and all(a > b for a, b in zip(v, v[1:]))), "a list of decreasing integer timesteps (empty = one step)"
DEVICE = (lambda v: bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", v))), "auto, cpu, cuda or cuda:N"
SAMPLERS = _choice("heun", "ddim")

RULES = {
    "ModelSection": {"toy_hidden": POS},  # model.kind: the registry in engine/kinds.py checks it
    "DataSection": {"dataset": _choice("digits", "toy2d", "prompts"), "resolution": POS, "num_pairs": POS,
                    "pair_sampler": SAMPLERS, "pair_steps": POS, "pair_guidance": FINITE_NONNEG,
                    "pair_seed": NONNEG, "shard_size": POS, "pair_batch_size": POS,
                    "loader": _choice("auto", "numpy", "dali"),
                    "pair_dtype": _choice("float32", "bfloat16", "float16")},
    "TrainSection": {"batch_size": POS, "reg_batch_size": POS, "micro_batch_size": NONNEG, "sample_count": NONNEG,
                     "max_steps": NONNEG, "lr_generator": FINITE_POS,
                     "lr_fake": FINITE_POS, "betas": BETAS, "weight_decay": FINITE_NONNEG,
                     "fake_updates_per_generator": POS, "fake_warmup_steps": NONNEG,
                     "fake_score": _choice("learned", "none"), "fake_loss_weighting": _choice("native", "x0"),
                     "grad_clip": FINITE_NONNEG, "ema_decay": DECAY, "dm_weight": FINITE_NONNEG,
                     "reg_weight": FINITE_NONNEG, "regression_loss": _choice("lpips", "mse"),
                     "lpips_backbone": _choice("pretrained", "random"), "lpips_net": _choice("alex", "vgg", "squeeze"),
                     "lpips_size": POS, "min_t_frac": FRACTION, "max_t_frac": FRACTION, "real_guidance": FINITE_NONNEG,
                     "seed": NONNEG, "log_every": POS, "sample_every": NONNEG, "save_every": NONNEG, "threads": NONNEG,
                     "device": DEVICE, "max_consecutive_skips": POS, "kernels": _choice("auto", "eager", "triton"),
                     "compile_mode": _choice("auto", "default", "reduce-overhead", "max-autotune",
                                             "max-autotune-no-cudagraphs"),
                     "compile_scope": _choice("generator", "all"), "fake_t_range": _choice("dm", "all"),
                     "dropout": _choice("none", "teacher"), "generator_timesteps": STEPS,
                     "gan_weight_generator": FINITE_NONNEG, "gan_weight_fake": FINITE_NONNEG,
                     "gan_min_t_frac": FRACTION, "gan_real_dequantize": FINITE_NONNEG,
                     "gan_max_t_frac": ((lambda v: 0 < v <= 1), "in (0, 1]"),
                     "section": ((lambda s: s.min_t_frac < s.max_t_frac and s.gan_min_t_frac < s.gan_max_t_frac),
                                 "min_t_frac < max_t_frac and gan_min_t_frac < gan_max_t_frac")},
    "DeepSpeedSection": {"zero_stage": _choice(3), "backend": _choice("auto", "nccl", "gloo"),
                         "precision": _choice("auto", "fp32", "bf16"), "teacher_dtype": _choice("auto", "fp32", "bf16"),
                         "persistence_threshold": NONNEG, "lr_warmup_steps": NONNEG, "keep_checkpoints": POS},
    "EvalSection": {"num_samples": POS, "teacher_sampler": SAMPLERS, "teacher_steps": POS, "batch_size": POS},
}


def check_values(section, where: str):
    """Raises ConfigError naming the first value its RULES refuse."""
    for key, (ok, what) in RULES.get(type(section).__name__, {}).items():
        if key == "section":
            if not ok(section):
                raise ConfigError(f"{where}: needs {what}".lstrip(": "))
            continue
        v = getattr(section, key)
        try:
            good = ok(v)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{where}.{key}".lstrip(".") + f" must be {what}, got {v!r}")


# ---------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check(value, tp, where: str):
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, d: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"{where}: unknown key '{k}' (known: {', '.join(sorted(names))})")
    kw = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    obj = cls(**kw)
    check_values(obj, where)
    return obj


def parse(cls, d: dict, source: str = "config"):
    """Build `cls` from a dict, raising ConfigError('<source>: key ... ') on the first bad key."""
    try:
        return _build(cls, d, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).lstrip(': ')}") from None


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return d


def load(path: str | Path, cls=DMDConfig, overrides: list[str] | None = None):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config {path}: top level must be an object")
    return parse(cls, apply_overrides(d, overrides), f"config {path}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
