"""Sample a distilled generator in its one step, or its few fixed steps (compiled, CUDA-graphed on a GPU), or its
teacher (multi-step ODE).

    python engine/infer.py                                    # the shipped digits generator -> runs/infer/
    python engine/infer.py --checkpoint RUN_OR_GENERATOR_DIR --num 1000 --out samples.npz
    python engine/infer.py --checkpoint runs/sd15 --prompt "a red bicycle" --prompt "a bowl of soup" --num 8
    python engine/infer.py --checkpoint RUN_DIR --teacher --sampler heun --steps 18 --num 1000 --out t.npz

--checkpoint: a run folder of engine/train.py or an exported generator folder (a run's generator/, which
for text models is also a stock StableDiffusionPipeline folder); sampling the generator reads nothing else. A
multi-step generator (train.generator_timesteps) runs its steps inside one call of the sampler: its noise holds
one unit draw per step, stacked on the channel axis, so a seed gives the same samples compiled or not.
--out: a path ending in .npz gets images (uint8 N×H×W×C), labels (class or prompt index; prompts cycle over
the samples) and, for text models, prompts; any other path is a folder of PNGs plus samples.npz and grid.png.
Toy runs write samples (N×2) instead of images.
"""
import _bootstrap  # noqa: F401

import argparse
import time
from pathlib import Path


from engine import cli
from engine.devices import pick_device, pick_dtype
from engine.errors import DMDError
from engine.exported import is_run_folder, open_generator
from engine.fast_sampler import OneStepSampler, SamplePath
from engine.files import resolve_path
from engine.outputs import SampleSink, check_out
from engine.sampling import balanced_labels, draw
from models.attention import AttentionError, use_attention

DEFAULT_GENERATOR = "assets/digits_generator"  # the `make demo` generator (bench/RESULTS.md has its FD)
GENERATOR_ONLY = {"dtype": "auto", "compile": "auto", "no_cuda_graphs": False, "attention": "sdpa", "decoder": None}


def arguments():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_GENERATOR, help=f"run or generator folder (default: {DEFAULT_GENERATOR})")
    p.add_argument("--out", default="runs/infer", help="a folder (PNGs + samples.npz + grid.png) or FILE.npz "
                   "(default: runs/infer)")
    p.add_argument("--num", type=int, default=100, help="samples to draw (default 100)")
    p.add_argument("--grid", help="also write the image grid (or toy scatter plot) here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="largest batch run at once (default 16; "
                   "500 with --teacher)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: float16 on a GPU, float32 on the CPU")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the sampler: "
                   "auto = on a GPU only (on the CPU, compiling costs more than it saves for a few hundred samples; "
                   "bench/latency.py has the figures)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU: compile, but capture no CUDA graphs")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--decoder", help="text models: an autoencoder folder to decode with instead of the generator's "
                   "vae/ (e.g. a tiny AutoencoderTiny); default: the run's model.decoder")
    p.add_argument("--prompt", action="append", help="text models: a prompt (repeat for several); default: the "
                   "run's data.prompts file")
    p.add_argument("--prompts", help="text models: a file with one prompt per line")
    p.add_argument("--teacher", action="store_true", help="sample the run's teacher instead (needs a run folder)")
    p.add_argument("--sampler", default="heun", choices=["heun", "ddim"], help="teacher ODE sampler")
    p.add_argument("--steps", type=int, default=18, help="teacher ODE steps")
    p.add_argument("--guidance", type=float, help="teacher only: classifier-free guidance scale (default 1)")
    args = p.parse_args()
    if args.num < 1:
        raise DMDError(f"--num must be >= 1, got {args.num}")
    args.batch_size = args.batch_size if args.batch_size is not None else 500 if args.teacher else 16
    if args.batch_size < 1:
        raise DMDError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.guidance is not None and not args.teacher:
        raise DMDError("--guidance applies to the teacher's sampler (--teacher); the one-step generator is "
                       "unguided (guidance was distilled into it)")
    generator_only = [f"--{k.replace('_', '-')}" for k, default in GENERATOR_ONLY.items() if getattr(args, k) != default]
    if args.teacher and generator_only:
        raise DMDError(f"{', '.join(generator_only)} apply to the one-step generator, not to --teacher (the "
                       f"teacher samples eagerly in float32 with the run's own decoder)")
    check_out(args.out, args.grid)
    return args


def prompt_list(args, default: list[str]) -> list[str]:
    from engine.text2image import load_prompts
    if args.prompt:
        return list(args.prompt)
    if args.prompts:
        return load_prompts(args.prompts)
    if not default:
        raise DMDError("a text generator needs prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return default


def sample_generator(args, folder: Path, device, dtype):
    """Generator sampling through the fixed-shape sampler: (fn for draw, noise shape, condition count, prompts,
    draw's device, progress label, what ran: called after sampling, as a fallback may change it)."""
    parts = open_generator(folder, args.decoder)
    if not parts.text and (args.prompt or args.prompts):
        raise DMDError(f"--prompt/--prompts need a text generator; '{parts.folder}' is a {parts.kind} generator")
    try:
        use_attention([parts.generator, parts.decoder], args.attention)
    except AttentionError as e:
        raise DMDError(str(e)) from None
    path = SamplePath(parts.generator, parts.encoder.text_encoder if parts.text else None, parts.decoder)
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    sampler = OneStepSampler(path, device, dtype, compile=compile_, max_batch=args.batch_size,
                             cuda_graphs=device.type == "cuda" and compile_ and not args.no_cuda_graphs)
    prompts, n_cond = None, parts.num_classes
    prep = lambda c: c  # noqa: E731
    if parts.text:
        prompts = prompt_list(args, parts.prompts)
        ids, n_cond = parts.token_ids(prompts), len(prompts)
        prep = lambda c: ids[c.cpu()]  # noqa: E731 - prompt indices -> token ids, the path's text input
    if compile_:
        print("compiling the sampler on first use of each batch size (--no-compile skips this)...", flush=True)
    fn = lambda z, c: sampler(z, prep(c) if c is not None else None)  # noqa: E731
    if parts.num_steps > 1:
        print(f"sampling a {parts.describe()}", flush=True)
    what = lambda: parts.describe(f"{parts.num_steps} NFE, {sampler.mode}, "  # noqa: E731
                                  f"{str(dtype).replace('torch.', '')}, {device}")
    return fn, parts.noise_shape, n_cond, prompts, "cpu", "sampling", what


def sample_teacher(args, folder: Path, device):
    """The run's teacher with its ODE sampler, eager, fp32 (the reference the generator is measured against);
    returns what sample_generator returns."""
    from engine.config import DMDConfig, load
    from engine.kinds import load_teacher
    from engine.sampling import teacher_sampler, with_condition
    from engine.text2image import condition_count, load_text
    from models.samplers import nfe
    if not is_run_folder(folder):
        raise DMDError(f"--teacher needs a run folder (config.json + generator/); '{folder}' is not one")
    overrides = [f"data.prompts={args.prompts}"] if args.prompts else []
    cfg = load(folder / "config.json", DMDConfig, overrides)
    teacher, _ = load_teacher(cfg)
    text = load_text(cfg, teacher, device)
    teacher.to(device)
    if text is None and (args.prompt or args.prompts):
        raise DMDError(f"--prompt/--prompts need a text model; '{folder}' has model.kind '{cfg.model.kind}'")
    if text is not None and args.prompt:
        text.prompts = list(args.prompt)
    fn = with_condition(teacher_sampler(teacher, args.sampler, args.steps, args.guidance or 1.0),
                        text.embed if text else None, text.decode if text else None)
    what = f"teacher {args.sampler} x{args.steps} ({nfe(args.sampler, args.steps)} NFE, {device})"
    return (fn, teacher.sample_shape, condition_count(teacher, text), text.prompts if text else None, device,
            "teacher", lambda: what)


def main():
    args = arguments()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    folder = resolve_path(args.checkpoint)
    t0 = time.time()
    plan = sample_teacher(args, folder, device) if args.teacher else sample_generator(args, folder, device, dtype)
    fn, shape, n_cond, prompts, draw_device, desc, what = plan
    labels = balanced_labels(args.num, n_cond)  # what draw uses: prompts cycle over the samples
    sink = SampleSink(args.out, args.num, [prompts[int(i)] for i in labels] if prompts else None, args.grid)
    try:  # batch by batch to disk: memory holds one batch whatever --num is
        draw(fn, args.num, shape, n_cond, args.seed, args.batch_size, desc, draw_device, sink=sink.add)
        dt = time.time() - t0
        written = sink.close()
    except BaseException:
        sink.abort()
        raise
    print(f"{what()}: {args.num} samples in {dt:.2f} s, start-up and compilation included")
    for k in ("samples", "grid"):
        if k in written:
            print(f"  {k}: {written[k]}")
    if written.get("pngs"):
        print(f"  {written['pngs']} PNGs in {Path(args.out)}/")


if __name__ == "__main__":
    cli.main_guard(main)
