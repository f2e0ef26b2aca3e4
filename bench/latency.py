"""Generator sampling latency: the stock diffusers call against the engine's sampler, eager, compiled, and compiled
with CUDA graphs (CUDA only), on the same exported generator folder.

    python bench/latency.py                                 # whatever device is here; CPU: digits + tiny SD
    python bench/latency.py --models sd15,sd15-taesd --json runs/latency.json   # GPU: SD1.5 architecture, 512 px
    python bench/latency.py --models tiny-sd --timesteps 999,749,499,249      # a 4-step generator (DMD2)

Models: `digits` is the shipped generator (assets/digits_generator); `tiny-sd` a tiny Stable Diffusion folder
at random weights (models/sd15.py), exported as a run exports its generator; `sd15` the same at SD1.5's real
configs (text encoder + UNet + VAE decoder, 512 px, random weights: speed only); `sd15-taesd` decodes with a
random-weight AutoencoderTiny instead (what model.decoder = a TAESD folder gives). Providers, per batch size:
    stock     text: StableDiffusionPipeline.from_pretrained(folder), the call dmd_model.json's pipeline_call
              names (num_inference_steps=1 for one step), guidance_scale=1, output_type="np", from the engine's
              start (latents = start_sigma * z); class-conditional: UNet2DModel + EDMEulerScheduler's
              preconditioning, one step, as the README shows it
    eager     engine/fast_sampler.py without compile or graphs
    compiled  torch.compile (static shapes)
    graphs    compiled + one CUDA graph per batch size
    +xformers the engine's rows again with xformers attention (where installed; the others use PyTorch SDPA)
Each row: per-batch latency p50/p90 (ms, host wall time from inputs on the host to images on the host,
tokenising included), images/s (batch / mean latency), warm-up time (the first two calls: compilation and
capture; the graphs row reuses the compiled row's compiled code, so its warm-up is mostly capture), and the
largest pixel difference to the eager sampler's images (0-255; none for a multi-step stock row, whose
pipeline draws its own noise between steps). Half precision on a GPU, fp32 on the CPU.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.devices import pick_device, pick_dtype  # noqa: E402
from engine.exported import export_initial, open_generator  # noqa: E402
from engine.fast_sampler import OneStepSampler, SamplePath  # noqa: E402
from models.attention import use_attention, xformers_available  # noqa: E402

PROMPT = "a red bicycle"  # within the tiny tokenizer's 16 characters; SD1.5 pads every prompt to 77 tokens anyway


def args_():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default=None, help="comma-separated: digits, tiny-sd, sd15, sd15-taesd "
                   "(default: digits,tiny-sd; on a GPU also sd15,sd15-taesd)")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--providers", default="stock,eager,compiled,graphs")
    p.add_argument("--attention", default="auto", help="engine rows' attention, comma-separated: sdpa, xformers "
                   "(default: sdpa, and xformers too where it is installed and the device is CUDA)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (default 30 on a GPU, 5 on a CPU)")
    p.add_argument("--json", default=None, help="write every row and the machine description here")
    p.add_argument("--timesteps", default=None, help="text models: export the generators with these steps, "
                   "comma-separated, e.g. 999,749,499,249 (default: one step at 999)")
    return p.parse_args()


def build(name: str, work: Path, device, timesteps=None) -> Path:
    """The exported generator folder for `name` (made under `work` when not shipped)."""
    if name == "digits":
        if timesteps:
            raise SystemExit("--timesteps applies to the text models (digits is the shipped one-step generator)")
        return ROOT / "assets" / "digits_generator"
    from models.sd15 import make_sd_folder
    size = "tiny" if name == "tiny-sd" else "sd15"
    teacher = work / f"{size}_teacher"
    if not teacher.exists():
        make_sd_folder(teacher, size, device=device, dtype=torch.float16 if size == "sd15" else None)
    gen = work / f"{size}_generator"
    if not gen.exists():
        export_initial(teacher, gen, torch.float16 if size == "sd15" else torch.float32, timesteps)
    if name == "sd15-taesd":
        from diffusers import AutoencoderTiny
        with torch.device(device):
            AutoencoderTiny().save_pretrained(work / "taesd")  # TAESD's default config, random weights
    return gen


class Stock:
    """The stock diffusers one-step call on the exported folder, returning uint8 images on the host."""

    def __init__(self, folder: Path, text: bool, device, dtype, decoder: Path | None):
        import diffusers
        self.text, self.device, self.dtype = text, device, dtype
        if text:
            meta = json.loads((folder / "dmd_model.json").read_text())
            self.call = meta.get("pipeline_call", {"num_inference_steps": 1, "guidance_scale": 1.0})
            self.start_sigma = meta.get("start_sigma", 1.0)
            kw = {"vae": diffusers.AutoencoderTiny.from_pretrained(decoder, dtype=dtype)} if decoder else {}
            self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                                          **kw).to(device)
            self.pipe.set_progress_bar_config(disable=True)
        else:
            self.unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", dtype=dtype).to(device)
            cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            if not cfg["_class_name"].startswith("EDM"):
                raise SystemExit(f"{folder}: the stock class-conditional call here is the README's EDM one; "
                                 f"this generator's scheduler is {cfg['_class_name']}")
            self.scheduler = diffusers.EDMEulerScheduler.from_pretrained(folder / "scheduler")

    @torch.no_grad()
    def __call__(self, z, cond, prompts):
        if self.text:  # a K-step generator's noise is K draws on the channel axis: the pipeline takes the first
            z0 = z[:, : self.pipe.unet.config.in_channels] * self.start_sigma
            img = self.pipe(prompts, **self.call, output_type="np", latents=z0.to(self.device, self.dtype)).images
            return torch.from_numpy((img * 255).round().astype("uint8"))
        sch, b = self.scheduler, len(z)  # the README's stock call: EDM preconditioning, one step from sigma_max
        sigma = torch.tensor(sch.config.sigma_max, device=self.device)
        x = sigma * z.to(self.device)
        out = self.unet(sch.precondition_inputs(x, sigma).to(self.dtype), sch.precondition_noise(sigma).expand(b),
                        class_labels=cond.to(self.device)).sample
        x0 = sch.precondition_outputs(x, out.float(), sigma)
        return ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def time_calls(fn, iters: int, device) -> list[float]:
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def bench_model(name, folder, work, device, dtype, batches, providers, iters, emit, attention=("sdpa",)):
    decoder = work / "taesd" if name == "sd15-taesd" else None
    parts = open_generator(folder, str(decoder) if decoder else None)
    path = SamplePath(parts.generator, parts.encoder.text_encoder if parts.text else None, parts.decoder)
    samplers = {"eager": dict(compile=False, cuda_graphs=False), "compiled": dict(compile=True, cuda_graphs=False),
                "graphs": dict(compile=True, cuda_graphs=True)}
    reference = {}  # batch -> the eager sampler's images, which every other row is compared with
    runs = [(p, "sdpa") for p in sorted(providers, key=lambda p: p != "eager")]
    runs += [(p, a) for a in attention if a != "sdpa" for p in providers if p != "stock"]
    for prov, attn in runs:
        if prov == "graphs" and device.type != "cuda":
            continue
        use_attention([path], attn)
        stock = Stock(folder, parts.text, device, dtype, decoder) if prov == "stock" else None
        for b in batches:
            if stock is not None:
                runner, notes = stock, []
            else:  # a sampler per batch size, so no row runs padded up to a larger one warmed up before it;
                # one path throughout: dynamo's cache lets the graphs row reuse the compiled row's code
                s = OneStepSampler(path, device, dtype, max_batch=b, **samplers[prov])
                runner, notes = (lambda s: lambda z, c, p: s(z, parts.token_ids(p) if parts.text else c))(s), s.notes
            g = torch.Generator().manual_seed(b)
            z = torch.randn((b, *parts.noise_shape), generator=g)
            cond = torch.arange(b) % (parts.num_classes or 1)
            prompts = [PROMPT] * b
            t0 = time.perf_counter()
            first = runner(z, cond, prompts)  # warm-up: compiles / captures this batch size
            runner(z, cond, prompts)
            warm = time.perf_counter() - t0
            ms = time_calls(lambda: runner(z, cond, prompts), iters, device)
            if prov == "eager" and attn == "sdpa":
                reference[b] = first
            comparable = b in reference and (prov != "stock" or parts.num_steps == 1)
            diff = int((first.int() - reference[b].int()).abs().max()) if comparable else None
            q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
            row = {"model": name, "provider": prov if attn == "sdpa" else f"{prov}+{attn}", "batch": b,
                   "steps": parts.num_steps, "p50_ms": statistics.median(ms), "p90_ms": q[8],
                   "images_per_s": b * 1000 / statistics.mean(ms), "warmup_s": warm, "max_diff_vs_eager": diff,
                   "notes": list(notes)}
            emit(row)
        runner = stock = None  # free this provider's models before the next one loads
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main():
    a = args_()
    device = pick_device(a.device)
    dtype = pick_dtype("auto", device)
    models = (a.models or ("digits,tiny-sd,sd15,sd15-taesd" if device.type == "cuda" else "digits,tiny-sd")).split(",")
    batches = [int(x) for x in a.batches.split(",")]
    providers = a.providers.split(",")
    iters = a.iters or (30 if device.type == "cuda" else 5)
    steps = [int(t) for t in a.timesteps.split(",")] if a.timesteps else None
    if steps and not a.models:  # the shipped digits generator has its one step
        models = [m for m in models if m != "digits"]
    attention = (["sdpa"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])
                 if a.attention == "auto" else a.attention.split(","))
    if "xformers" in attention and not xformers_available():
        sys.exit("--attention xformers: xformers is not installed here")
    import platform
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    result = {"command": " ".join(["python"] + sys.argv), "device": machine, "torch": torch.__version__,
              "dtype": str(dtype).replace("torch.", ""), "iters": iters, "rows": []}
    print(f"# bench/latency.py on {machine}; torch {torch.__version__}, {result['dtype']}, {iters} timed calls per row")
    print(f"{'model':<11} {'provider':<17} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>9} {'ms/img':>8} "
          f"{'warm-up s':>9} {'max diff':>8}")

    def emit(row):
        print(f"{row['model']:<11} {row['provider']:<17} {row['batch']:>5} {row['p50_ms']:>9.2f} {row['p90_ms']:>9.2f} "
              f"{row['images_per_s']:>9.1f} {row['p50_ms'] / row['batch']:>8.2f} {row['warmup_s']:>9.1f} "
              f"{'-' if row['max_diff_vs_eager'] is None else row['max_diff_vs_eager']:>8}", flush=True)
        result["rows"].append(row)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            try:
                folder = build(name, Path(tmp), device, steps)
                bench_model(name, folder, Path(tmp), device, dtype, batches, providers, iters, emit, attention)
            except ImportError as e:  # e.g. no transformers on a bare GPU machine: the other models still run
                print(f"{name}: skipped, a package is missing ({e})", flush=True)
    speedups(result["rows"])


def speedups(rows):
    """Ratios against the stock call, per model and batch size (the figures the targets are stated in)."""
    stock = {(r["model"], r["batch"]): r for r in rows if r["provider"] == "stock"}
    lines = []
    for r in rows:
        s = stock.get((r["model"], r["batch"]))
        if s and r["provider"] != "stock":
            lines.append(f"  {r['model']:<11} batch {r['batch']:>3} {r['provider']:<17} {s['p50_ms'] / r['p50_ms']:6.2f}x "
                         f"faster (p50 latency), {r['images_per_s'] / s['images_per_s']:6.2f}x the images/s")
    if lines:
        print("\nagainst the stock diffusers call:\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
