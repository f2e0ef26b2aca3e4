"""A plan before the launch: what each process will hold, from the config files alone (no weights are read).
    python engine/train.py --config C --out DIR --dry-run [--processes N] [--gpu-memory GIB]
Networks are built from their *.json files on the meta device (shapes, no storage): the teacher as
Denoiser.from_pretrained(weights=False) does, its copies as engine/kinds.py makes them; text kinds add the CLIP text
encoder (text_encoder/config.json) and autoencoder (model.decoder or vae/); LPIPS is the lpips package's network.
State per rank, by dtype, as engine/zero.py / plain.py keep it. ZeRO-3: each parameter split into ceil(numel/N)
per rank (also kept whole if <= deepspeed.persistence_threshold elements); generator and fake score: parameters and
fp32 gradients (grad_accum_dtype), parameters in the compute dtype ("auto" = bf16), fp32 masters, AdamW's two fp32 states, EMA (fp32), a
reduce bucket of 5e8 elements each (DeepSpeed's default, on the GPU), during the step an fp32 copy of a gradient
partition. Gathered whole in flight: what a trained model reuses within DeepSpeed's max_reuse_distance (1e9
elements; forward to backward: up to half of it) + the prefetch bucket (5e7). offload_params moves parameter
partitions to CPU memory; offload_optimizer gradients, masters, AdamW states, EMA and an fp32 gradient buffer.
Plain: whole; trained models fp32 (bf16 autocast per deepspeed.precision). Frozen nets: teacher_dtype; LPIPS fp32.
Activations are measured: a forward of each network at one sample on the meta device counts what autograd saves
(saved_tensors_hooks, each storage once, parameters excluded), bf16 autocast emulated (conv/matmul inputs bf16;
norms, softmax, losses fp32), attention as flash attention saves it (q, k, v, output, fp32 log-sum-exp; the meta
device's math path would store the attention matrix). Gradient checkpointing (diffusers' units: ResNet and
transformer blocks): saves outside the units + each unit's inputs + the largest unit's own saves (its recompute).
Transients (a forward without grad, e.g. the teacher on CFG's doubled batch; backward's gradients): the largest
input + output of one module. Per-sample figures times the micro-batch (train.micro_batch_size, 0 = the process's
batch); engine/trainer.py runs DM, regression (generator, decoder, LPIPS) and fake-score micro-batches in turn,
each with its backward: the peak is the largest. GPU total = lasting items + the larger transient, a model of
torch.cuda.max_memory_allocated; the verdict adds 1 GiB per rank (CUDA context, NCCL, allocator slack).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from models.denoiser import Denoiser, schedule_from_scheduler_config
from models.text import LatentDecoder

from .backend import attach_gan_head, check_world
from .errors import DMDError
from .files import atomic_write_text, ensure_dir, resolve_path
from .kinds import model_kind, teacher_folder
from .losses import LPIPSRegression, MSERegression
from .plan_report import GIB, RESERVE, render
from .text2image import DecodedRegression

REDUCE_BUCKET, PREFETCH, REUSE = int(5e8), int(5e7), int(1e9)  # DeepSpeed's defaults (ds_config sets none)
LOW_OPS = {"conv1d", "conv2d", "conv_transpose2d", "linear", "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm",
           "einsum", "scaled_dot_product_attention"}  # autocast's lower-precision list (what these nets call)
F32_OPS = {"group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss", "exp", "pow", "__pow__", "rsqrt", "norm",
           "normalize", "sum", "cumsum", "softplus", "log"}  # autocast's float32 list (what these nets call)


def _cpu_schedule(conf):  # the schedule keeps Python floats of its tables: they need values
    with torch.device("cpu"):
        return schedule_from_scheduler_config(conf)


class Nets:
    """The run's networks without weights, in the dtypes the backend keeps them in."""

    def __init__(self, cfg):
        self.cfg, kind, ds = cfg, model_kind(cfg.model.kind), cfg.deepspeed
        if ds.enabled and not kind.folder:
            raise DMDError(f"deepspeed.enabled needs a teacher folder, got model.kind '{cfg.model.kind}'")
        gpu = ds.enabled or cfg.train.device != "cpu"  # "auto" = bf16 on a GPU, as engine.backend.dtype_choice
        half = lambda c: torch.bfloat16 if c == "bf16" or (c == "auto" and gpu) else torch.float32  # noqa: E731
        self.zero, self.tdtype, compute = ds.enabled, half(ds.teacher_dtype), half(ds.precision)
        self.dtype = compute if self.zero else torch.float32  # trained models' storage: plain keeps fp32 masters
        self.low = torch.bfloat16 if torch.bfloat16 in (compute, self.tdtype) else None  # autocast on
        self.device = torch.device("meta" if kind.folder else "cpu")  # the toy's analytic teacher needs values
        self.text = self.decoder = self.regression = self.lpips = self.cond_shape = None
        with self.device, warnings.catch_warnings(), mock.patch(
                "models.denoiser.schedule_from_scheduler_config", _cpu_schedule):
            warnings.simplefilter("ignore")
            folder = teacher_folder(cfg) if kind.folder else None
            teacher = Denoiser.from_pretrained(folder, weights=False) if kind.folder else kind.load_teacher(cfg)[0]
            kind.check(cfg, teacher)
            if kind.text:
                self._text_parts(folder, teacher)
            self.teacher = teacher.eval().requires_grad_(False)
            self.generator, self.fake = kind.trainables(cfg, teacher)
            attach_gan_head(self.fake, cfg, early_exit=False)  # counted with the fake score; whole D passes
            self.regression = self._regression() if cfg.train.reg_weight > 0 else None
        for m, d in [(m, d) for m, d in ((self.teacher, self.tdtype), (self.generator, self.dtype), (self.fake,
                     self.dtype), (self.text, self.tdtype), (self.decoder, self.tdtype)) if m is not None]:
            m._apply(lambda t, d=d: t.to(d) if t.is_floating_point() else t)
        self.parameters = {k: sum(p.numel() for p in m.parameters()) for k, m in (
            ("teacher", self.teacher), ("generator", self.generator), ("fake", self.fake), ("text_encoder", self.text),
            ("autoencoder", self.decoder), ("lpips", self.lpips)) if m is not None}

    def _text_parts(self, folder: Path, teacher):
        import diffusers
        from transformers import CLIPTextConfig, CLIPTextModel
        dec = resolve_path(self.cfg.model.decoder) if self.cfg.model.decoder else folder / "vae"
        if not (folder / "text_encoder" / "config.json").is_file():  # a missing dec/config.json: FileNotFoundError
            raise DMDError(f"model folder '{folder}' has no text_encoder/config.json")
        conf = CLIPTextConfig.from_pretrained(folder / "text_encoder")
        self.text, self.cond_shape = CLIPTextModel(conf), (conf.max_position_embeddings, conf.hidden_size)
        dconf = json.loads((dec / "config.json").read_text())
        name = dconf.get("_class_name", "AutoencoderKL")
        if name not in ("AutoencoderKL", "AutoencoderTiny"):
            raise DMDError(f"{dec}/config.json: unsupported autoencoder _class_name '{name}'")
        self.decoder = LatentDecoder(getattr(diffusers, name).from_config(dconf))
        res, f = self.cfg.data.resolution, self.decoder.factor
        if res % f:
            raise DMDError(f"data.resolution = {res} is not a multiple of the autoencoder's factor {f} ({dec})")
        teacher.sample_shape = (teacher.sample_shape[0], res // f, res // f)
        teacher.null_cond = torch.zeros(1, *self.cond_shape)

    def _regression(self):
        tc, loss = self.cfg.train, MSERegression()
        if tc.regression_loss == "lpips":  # LPIPSRegression's own forward around the lpips network, no weights
            import lpips
            loss = LPIPSRegression.__new__(LPIPSRegression)
            nn.Module.__init__(loss)
            loss.lpips = lpips.LPIPS(net=tc.lpips_net, pretrained=False, pnet_rand=True, verbose=False)
            loss.lpips.to(self.device).eval().requires_grad_(False)  # its buffers are made on the CPU
            loss.size, loss.backbone, self.lpips = tc.lpips_size, tc.lpips_backbone, loss.lpips
        return DecodedRegression(loss, self.decoder) if self.decoder is not None else loss


class _Meter(TorchFunctionMode):
    """Saved tensors per storage; bf16 autocast and flash attention emulated; largest module in + out and unit."""

    def __init__(self, low, tensors):
        super().__init__()
        self.low, self.stack, self.unit, self.io = low, [], 0, 0
        self.skip = {t.untyped_storage()._cdata for t in tensors}

    def add(self, t):
        s = t.untyped_storage()
        if s._cdata not in self.skip:
            self.stack[-1][s._cdata] = (s, s.nbytes())
        return t

    @contextlib.contextmanager
    def count(self):
        self.stack.append({})
        with torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t):
            yield self.stack[-1]
        self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, getattr(func, "__name__", "")
        if self.low is not None and (name in LOW_OPS or name in F32_OPS):
            to = self.low if name in LOW_OPS else torch.float32
            args, kwargs = tree_map(lambda x: x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point()
                                    else x, (args, kwargs))
        if name != "scaled_dot_product_attention":
            return func(*args, **kwargs)
        q, k, v = args[:3]
        out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            for x in (q, k, v, out.requires_grad_(), torch.zeros(q.shape[:-1], device=q.device)):  # + fp32 LSE
                self.add(x)
        return out

    def leaf(self, module, inputs, output):
        leaves = [t for t in tree_leaves((inputs, output)) if isinstance(t, torch.Tensor)]
        self.io = max(self.io, sum(t.numel() * t.element_size() for t in leaves))

    def ckpt(self, module, *args):
        """diffusers' gradient_checkpointing_func: the unit's inputs stay, its own saved tensors are counted apart."""
        tree_map(lambda a: self.add(a) if isinstance(a, torch.Tensor) else a, args)
        with self.count() as inner:
            out = module(*args)
        self.unit = max(self.unit, sum(b for _, b in inner.values()))
        return out


def _measure(fn, mods, low, grad=True, ckpt=False) -> dict:
    meter = _Meter(low, [t for m in mods for t in (*m.parameters(), *m.buffers())])
    hooks = [x.register_forward_hook(meter.leaf) for m in mods for x in m.modules() if next(x.children(), None) is None]
    units = [u for m in mods for u in m.modules() if ckpt and getattr(u, "_supports_gradient_checkpointing", False)][:1]
    for u in units:
        u.enable_gradient_checkpointing(meter.ckpt)
    try:
        with torch.set_grad_enabled(grad), meter, meter.count() as top:
            fn()
    finally:
        for undo in [h.remove for h in hooks] + [u.disable_gradient_checkpointing for u in units]:
            undo()
    return {"saved": sum(b for _, b in top.values()), "unit": meter.unit, "io": meter.io}


def activations(nets: Nets) -> dict:
    """Per-sample activation bytes of each forward of a training step (see the module doc)."""
    dev, tea = nets.device, nets.teacher
    x, t = torch.zeros((1, *tea.sample_shape), device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    c = (torch.zeros((1, *nets.cond_shape), dtype=nets.tdtype, device=dev) if nets.cond_shape else
         torch.zeros(1, dtype=torch.long, device=dev) if tea.num_classes else None)
    out = {}
    for name, mod, fn in (("generator", nets.generator, lambda: nets.generator(x, c)),
                          ("fake", nets.fake, lambda: nets.fake(x, t, c))):
        off, on = _measure(fn, [mod], nets.low), _measure(fn, [mod], nets.low, ckpt=True)
        out[name] = {"saved_off": off["saved"], "saved_on": on["saved"], "unit": on["unit"], "io": off["io"]}
    scale = nets.cfg.train.real_guidance if nets.cond_shape or tea.null_class is not None else 1.0
    out["teacher_io"] = _measure(lambda: tea.guided(x, t, c, scale), [tea], nets.low, grad=False)["io"]
    if nets.regression is not None:
        xr = torch.zeros_like(x).requires_grad_()  # the regression module holds the decoder
        out["regression"] = _measure(lambda: nets.regression(xr, x).mean(), [nets.regression], nets.low)
    return out


def activation_peak(a: dict, cfg, m: int, mr: int, ckpt: bool) -> int:
    """The largest activation bytes of a step whose DM, regression and fake-score micro-batches run in turn."""
    tc, g, f, key = cfg.train, a["generator"], a["fake"], "saved_on" if ckpt else "saved_off"
    learned = tc.fake_score == "learned"
    ug, uf, phases = g["unit"] * ckpt, f["unit"] * ckpt, [0]
    if tc.dm_weight > 0:  # DM micro-batch (the teacher's forward, then backward); fake-score training. GAN: the
        # generator's loss keeps a fake-score pass; the fake's update three (denoising, D(generated), D(real))
        gan_g, passes = f[key] * (tc.gan_weight_generator > 0), 3 if tc.gan_weight_fake > 0 else 1
        phases += [m * (g[key] + gan_g + max(a["teacher_io"], ug + g["io"])), m * (passes * f[key] + uf + f["io"]) * learned]
    if "regression" in a:
        phases.append(mr * (g[key] + a["regression"]["saved"] + ug + max(g["io"], a["regression"]["io"])))
    return max(phases)


def plan(nets: Nets, acts: dict, n: int, gpu_bytes: int, gpu_source: str) -> dict:
    cfg, ds, tc = nets.cfg, nets.cfg.deepspeed, nets.cfg.train
    if n > 1 and not nets.zero:
        raise DMDError(f"{n} processes need deepspeed.enabled (the plain backend is one process)")
    check_world(cfg, n)
    on_cpu, items = not nets.zero and tc.device == "cpu", {}

    def put(key, label, gpu=0, cpu=0, transient=False):
        gpu, cpu = (0, gpu + cpu) if on_cpu else (gpu, cpu)
        items[key] = {"label": label, "gpu": int(gpu), "cpu": int(cpu), "transient": transient}

    (c, cn), (tb, tn) = ((d.itemsize, str(d).removeprefix("torch.")) for d in (nets.dtype, nets.tdtype))
    step, share, opt = 0, f"1/{n}" if nets.zero else "whole", "cpu" if nets.zero and ds.offload_optimizer else "gpu"
    for name in ("teacher", "generator", "fake"):
        numels = [p.numel() for p in getattr(nets, name).parameters()]
        d, dn = (tb, tn) if name == "teacher" else (c, cn)
        part = sum(-(-k // n) for k in numels)
        whole = sum(k for k in numels if k <= ds.persistence_threshold) if nets.zero else 0
        off = nets.zero and ds.offload_params
        put(f"{name}.parameters", f"{name} parameters ({dn}, {share}" + (", small ones whole)" if whole else ")"),
            gpu=d * whole + (0 if off else d * part), cpu=d * part if off else 0)
        if name == "teacher":
            continue
        rows = [("gradients", f"gradients (fp32, {share})", 4), ("optimizer", f"AdamW states (2 x fp32, {share})", 8)]
        rows += [("masters", f"fp32 master weights ({share})", 4)] if nets.zero else []
        rows += [("fp32_grads", f"fp32 gradient buffer ({share})", 4)] if opt == "cpu" else []
        rows += [("ema", f"EMA (fp32, {share})", 4)] if name == "generator" and tc.ema_decay > 0 else []
        for key, label, b in rows:
            put(f"{name}.{key}", f"{name} {label}", **{opt: b * part})
        if nets.zero:
            put(f"{name}.reduce_bucket", f"{name} DeepSpeed reduce bucket ({cn})", gpu=c * REDUCE_BUCKET)
            step = 0 if opt == "cpu" else 4 * part
    if nets.zero:
        put("gathered", "parameters gathered in flight (reuse distance / 2 + prefetch)",
            gpu=c * min(nets.parameters["generator"], REUSE // 2 + PREFETCH))
    for key, label, d in (("text_encoder", f"text encoder ({tn}, whole)", tb), ("autoencoder", f"autoencoder "
                          f"({tn}, whole)", tb), ("lpips", "LPIPS network (fp32, whole)", 4)):
        if key in nets.parameters:
            put(key, label, gpu=d * nets.parameters[key])
    b, br = tc.batch_size // n, tc.reg_batch_size // n
    m, mr = min(tc.micro_batch_size or b, b), min(tc.micro_batch_size or br, br)
    sample = math.prod(nets.teacher.sample_shape)
    put("batch", "this process's batch (z, eps, samples, conditions, pairs)", gpu=(b + br * (tc.reg_weight > 0)) * (
        12 * sample + tb * math.prod(nets.cond_shape or (4,))))
    ckpt = nets.zero and ds.gradient_checkpointing
    peaks = {k: activation_peak(acts, cfg, m, mr, k) for k in (True, False)}
    put("activations", f"activations, peak micro-batch (checkpointing {'on' if ckpt else 'off'})", gpu=peaks[ckpt],
        transient=True)
    put("step", "optimiser step: fp32 copy of a gradient partition", gpu=step, transient=True)
    total = {w: sum(i[w] for i in items.values() if not i["transient"])
             + max([i[w] for i in items.values() if i["transient"]] + [0]) for w in ("gpu", "cpu")}
    disk = cfg.data.num_pairs * (2 * sample * getattr(torch, cfg.data.pair_dtype).itemsize + 8)  # z and y, int64 label
    disk += 3 * 128 * math.ceil(cfg.data.num_pairs / cfg.data.shard_size)  # .npy headers
    return {"name": cfg.name, "processes": n, "engine": "deepspeed-zero3" if nets.zero else "plain",
            "device": "cpu" if on_cpu else "cuda", "parameters": nets.parameters,
            "dtypes": {"compute": cn, "teacher": tn},
            "micro_batch": {"dm": m, "regression": mr, "dm_per_rank": b, "regression_per_rank": br},
            "gradient_checkpointing": bool(ckpt), "activations": {
                "checkpointing_on": peaks[True], "checkpointing_off": peaks[False], "per_sample": acts,
                "method": "saved tensors counted in a meta-device forward at 1 sample, times the micro-batch"},
            "per_rank_bytes": {**total, "gpu_with_reserve": total["gpu"] + RESERVE, "items": items},
            "gpu_memory_bytes": gpu_bytes, "gpu_memory_source": gpu_source, "pairs_disk_bytes": disk,
            "pair_dtype": cfg.data.pair_dtype, "fits": on_cpu or total["gpu"] + RESERVE <= gpu_bytes}


def dry_run(cfg, out, processes=None, gpu_gib=None) -> dict:
    """train.py --dry-run: prints the plan and writes OUT/plan.json; reads *.json files only."""
    n = int(os.environ.get("WORLD_SIZE", "1")) if processes is None else processes
    out = Path(out)
    for bad, what in ((n < 1, f"--processes must be >= 1, got {n}"), (out.exists() and not out.is_dir(), f"--out "
                      f"'{out}' is a file, not a folder"), (gpu_gib is not None and not (math.isfinite(gpu_gib) and
                      gpu_gib > 0), f"--gpu-memory must be a positive number of GiB, got {gpu_gib}")):
        if bad:
            raise DMDError(what)
    mem, source = ((int(gpu_gib * GIB), "--gpu-memory") if gpu_gib is not None else
                   (torch.cuda.get_device_properties(0).total_memory, f"this machine's {torch.cuda.get_device_name(0)}")
                   if torch.cuda.is_available() else (80 * GIB, "default 80 GiB: no GPU on this machine"))
    p = plan(nets := Nets(cfg), activations(nets), n, mem, source)
    atomic_write_text(ensure_dir(out) / "plan.json", json.dumps(p, indent=2))
    print(render(p))
    return p
