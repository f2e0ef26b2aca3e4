"""Draw samples from a distilled generator (one step) or from its teacher (multi-step ODE).

    python engine/infer.py --checkpoint RUN_DIR --num 1000 --out samples.npz [--grid grid.png]
    python engine/infer.py --checkpoint RUN_DIR --teacher --sampler heun --steps 18 --num 1000 --out t.npz
    python engine/infer.py --checkpoint SD_RUN --prompt "a red bicycle" --prompt "a bowl of soup" --num 8 --out s.npz

The .npz holds images (uint8 N×H×W×C) and labels (int, N; for text models the prompt index, prompts cycling
over the samples); toy runs write samples (N×2) instead. The generator folder of a text run is also a stock
StableDiffusionPipeline folder (one step: num_inference_steps=1, guidance_scale=1).
"""
import _bootstrap  # noqa: F401

import argparse
import time
from pathlib import Path

from engine import cli
from engine.config import DMDConfig, load
from engine.errors import DMDError
from engine.kinds import load_generator, load_teacher
from engine.sampling import draw, one_step, save_samples, teacher_sampler
from engine.text2image import condition_count, load_text
from models.samplers import nfe


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder written by engine/train.py")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--grid", help="also write a PNG grid (images) or scatter plot (toy) of the first samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--teacher", action="store_true", help="sample the teacher instead of the generator")
    p.add_argument("--sampler", default="heun", choices=["heun", "ddim"])
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--prompt", action="append", help="text models: a prompt (repeat for several); default: the "
                   "run's data.prompts file")
    p.add_argument("--prompts", help="text models: a file with one prompt per line")
    args = p.parse_args()
    run = Path(args.checkpoint)
    if not (run / "config.json").is_file():
        raise DMDError(f"'{run}' is not a run folder (no config.json)")
    if args.num < 1:
        raise DMDError(f"--num must be >= 1, got {args.num}")
    if args.batch_size < 1:
        raise DMDError(f"--batch-size must be >= 1, got {args.batch_size}")
    overrides = [f"data.prompts={args.prompts}"] if args.prompts else []
    cfg = load(run / "config.json", DMDConfig, overrides)
    teacher, _ = load_teacher(cfg)
    text = load_text(cfg, teacher)
    if text is None and (args.prompt or args.prompts):
        raise DMDError(f"--prompt/--prompts need a text model; '{run}' has model.kind '{cfg.model.kind}'")
    if text is not None and args.prompt:
        text.prompts = list(args.prompt)
    num_classes = condition_count(teacher, text)
    condition, to_images = (text.embed, text.decode) if text is not None else (None, None)
    if args.teacher:
        fn, what = one_step(teacher_sampler(teacher, args.sampler, args.steps, args.guidance), condition, to_images), \
            f"teacher {args.sampler} x{args.steps} ({nfe(args.sampler, args.steps)} NFE)"
    else:
        fn, what = one_step(load_generator(run / "generator", cfg.model.kind).eval(), condition, to_images), "generator (1 NFE)"
    t0 = time.time()
    x, labels = draw(fn, args.num, teacher.sample_shape, num_classes, args.seed, args.batch_size, what)
    dt = time.time() - t0
    save_samples(args.out, x, labels, args.grid)
    print(f"{what}: {args.num} samples in {dt:.2f} s ({1000 * dt / args.num:.2f} ms/sample, CPU) -> {args.out}")


if __name__ == "__main__":
    cli.main_guard(main)
