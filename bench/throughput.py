"""Throughput of the DMD hot path: Triton kernels vs eager torch vs torch.compile, and the full training step.

    python bench/throughput.py --json runs/throughput.json                    # CUDA (all rows)
    python bench/throughput.py --device cpu --json runs/throughput_cpu.json   # CPU: Triton interpreter, digits step

Kernel rows, per shape: `ms` per call (CUDA: median device time with L2 cleared before each call; CPU: wall time),
`wall ms` (back-to-back calls, synchronised wall time over N calls: includes launch overhead), launches per call
and the launched kernels' own summed device time (torch.profiler on CUDA, L2 cleared; n/a on CPU: the event-timed
`ms` also counts gaps where the device waits for the host's launches), the bytes that must move (each input read once, each output
written once: a lower bound, so GB/s is an effective bandwidth), GB/s and its fraction of this run's measured
device copy bandwidth. Step rows: one generator update + one fake-score update (regression term off: it needs
pairs and its LPIPS cost does not change with kernels), in samples/s, peak memory and, from one profiled step,
device kernels, host-device syncs and copies per step: eager, Triton kernels,
kernels + torch.compile of the generator, kernels + torch.compile of all three networks (train.compile_scope).
On CPU the Triton rows run in the interpreter: they check the code runs, they are not speed figures.
"""
import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name -> (B, C, H, W); the targets' shapes first, so a run cut short has measured them
    "imagenet64": (256, 3, 64, 64),
    "sd15-latent": (32, 4, 64, 64),
    "sdxl-latent": (8, 4, 128, 128),
    "digits": (64, 1, 8, 8),
}


def args_():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: a GPU when there is one")
    p.add_argument("--json", default=None, help="write all rows and the machine description here")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="kernel inputs' dtype")
    p.add_argument("--iters", type=int, default=None, help="timed calls per kernel row (default 50 CUDA, 3 CPU)")
    p.add_argument("--step-iters", type=int, default=None, help="timed training steps (default 20 CUDA, 5 CPU)")
    p.add_argument("--sd15-batch", type=int, default=8)
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile column and row")
    p.add_argument("--no-step", action="store_true", help="kernel rows only")
    p.add_argument("--no-kernels", action="store_true", help="training-step rows only")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"kernel-row shapes, comma-separated (default all: "
                   f"{', '.join(f'{k} {v}' for k, v in SHAPES.items())})")
    a = p.parse_args()
    a.shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    unknown = [s for s in a.shapes if s not in SHAPES]
    if unknown or not a.shapes:
        p.error(f"--shapes: unknown shape {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"choose from {', '.join(SHAPES)}")
    return a


ARGS = args_()
import torch  # noqa: E402

if ARGS.device == "auto":
    ARGS.device = "cuda" if torch.cuda.is_available() else "cpu"
if ARGS.device == "cpu":  # before kernels.* is imported: triton picks the interpreter at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.losses import distribution_matching_loss  # noqa: E402
from kernels import dmd, noise  # noqa: E402

from bench.step_models import digits_trainer, sd15_trainer  # noqa: E402
from bench.timing import copy_bandwidth, device_time, launches, step_profile, sync, timeit  # noqa: E402

DEV = torch.device(ARGS.device)
CUDA = DEV.type == "cuda"


def compiled(fn):
    if ARGS.no_compile:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"torch.compile unavailable: {e}")
        return None


# --- kernel rows ---------------------------------------------------------------------------------------------
def kernel_cases(shape, dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    x, pr, pf, eps = (torch.randn(shape, generator=g, device=DEV, dtype=dtype) for _ in range(4))
    xg = x.clone().requires_grad_(True)
    sch_a = torch.linspace(1.0, 0.05, 1000, device=DEV)
    sch_s = (1 - sch_a.square()).sqrt()
    t = torch.randint(20, 980, (shape[0],), generator=g, device=DEV)
    n, es = x.numel(), x.element_size()

    def fwd_bwd(f):
        def run():
            xg.grad = None
            f(xg, pr, pf).backward()
        return run

    def eager_noise(x, eps):  # what NoiseSchedule.add_noise does: coefficients gathered per sample, broadcast
        shape = (-1,) + (1,) * (x.ndim - 1)
        return sch_a[t].to(x.dtype).view(shape) * x + sch_s[t].to(x.dtype).view(shape) * eps

    ref_noise = eager_noise
    ref_philox = lambda x: eager_noise(x, torch.randn_like(x))
    c_loss, c_noise, c_philox = compiled(distribution_matching_loss), compiled(ref_noise), compiled(ref_philox)
    with torch.no_grad():
        fwd = lambda f: (lambda: f(x, pr, pf))
        yield "dmd_loss fwd", 3 * n * es, {
            "eager": fwd(distribution_matching_loss), "triton": fwd(dmd.dmd_loss),
            "compile(eager)": fwd(c_loss) if c_loss else None}
    yield "dmd_loss fwd+bwd", 4 * n * es, {
        "eager": fwd_bwd(distribution_matching_loss), "triton": fwd_bwd(dmd.dmd_loss),
        "compile(eager)": fwd_bwd(c_loss) if c_loss else None}
    yield "add_noise (eps given)", 3 * n * es, {
        "eager": lambda: ref_noise(x, eps), "triton": lambda: noise.add_noise(x, t, sch_a, sch_s, eps=eps),
        "compile(eager)": (lambda: c_noise(x, eps)) if c_noise else None}
    yield "add_noise (Philox eps)", 2 * n * es, {
        "eager": lambda: ref_philox(x), "triton": lambda: noise.add_noise(x, t, sch_a, sch_s, seed=1, offset=0),
        "compile(eager)": (lambda: c_philox(x)) if c_philox else None}


def kernel_rows(copy_gbs, dtype, iters):
    rows = []
    for name in ARGS.shapes:
        shape = SHAPES[name]
        for op, nbytes, impls in kernel_cases(shape, dtype):
            eager_ms = eager_wall = None
            for impl, fn in impls.items():
                if fn is None:
                    continue
                try:
                    # the interpreter is slow: fewer calls for it, but never fewer than one timed call
                    n_it = max(1, iters if (CUDA or impl != "triton") else min(iters, 2))
                    wall = timeit(fn, n_it, DEV, warmup=2 if CUDA or impl != "triton" else 1)
                    sec = device_time(fn, DEV) or wall
                    n_launch, kernel_ms = launches(fn, DEV)
                    row = {"shape": name, "dims": list(shape), "op": op, "impl": impl, "ms": sec * 1e3,
                           "wall_ms": wall * 1e3, "launches": n_launch, "kernel_ms": kernel_ms, "bytes": nbytes,
                           "gb_s": nbytes / sec / 1e9}
                    row["frac_copy_bw"] = row["gb_s"] / copy_gbs
                    row["kernel_frac_copy_bw"] = nbytes / (kernel_ms / 1e3) / 1e9 / copy_gbs if kernel_ms else None
                    if impl == "eager":
                        eager_ms, eager_wall = row["ms"], row["wall_ms"]
                    row["speedup_vs_eager"] = eager_ms / row["ms"] if eager_ms else None
                    row["wall_speedup_vs_eager"] = eager_wall / row["wall_ms"] if eager_wall else None
                except Exception as e:  # noqa: BLE001 - a failed column is reported, not fatal
                    row = {"shape": name, "dims": list(shape), "op": op, "impl": impl, "error": repr(e)[:200]}
                rows.append(row)
                emit("kernels", row, fmt_kernel(row))
    return rows


def fmt_kernel(r):
    if "error" in r:
        return f"| {r['shape']} | {r['op']} | {r['impl']} | error: {r['error']} | | | | | | | |"
    x = lambda v: f"{v:.2f}x" if v else "n/a"  # noqa: E731
    opt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    return (f"| {r['shape']} | {r['op']} | {r['impl']} | {r['ms']:.3f} | {x(r['speedup_vs_eager'])} | "
            f"{r['wall_ms']:.3f} | {x(r['wall_speedup_vs_eager'])} | {r['launches']} | "
            f"{r['bytes'] / 1e6:.2f} | {r['gb_s']:.2f} | {r['frac_copy_bw']:.1%} | {opt(r['kernel_ms'], '.3f')} | "
            f"{opt(r['kernel_frac_copy_bw'], '.1%')} |")


# --- full training step ----------------------------------------------------------------------------------
def step_rows(iters):
    rows = []
    # compile scope: None (eager modules), the generator alone, or all three networks (engine/compile.py)
    variants = [("eager", "eager", None), ("kernels", "triton", None), ("kernels+compile", "triton", "generator"),
                ("kernels+compile(all)", "triton", "all")]
    # SD1.5 first: on a time-limited GPU machine the rows that matter most are measured before a cut-off
    models = [("sd15-unet-bf16", functools.partial(sd15_trainer, DEV, ARGS.sd15_batch), None) if CUDA else
              ("sd15-unet-bf16", None, "skipped: SD1.5 needs a GPU and no GPU was used in this run"),
              ("digits", functools.partial(digits_trainer, DEV), None)]
    for model, build, skip in models:
        eager_sps = None
        for name, kernels, comp in variants:
            row = {"model": model, "variant": name}
            if skip or (comp and ARGS.no_compile):
                row["skipped"] = skip or "--no-compile"
            else:
                try:
                    row.update(run_step(build, kernels, comp, iters, model.startswith("sd15")))
                    eager_sps = row["samples_per_s"] if name == "eager" else eager_sps
                    row["speedup_vs_eager"] = row["samples_per_s"] / eager_sps if eager_sps else None
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:300]
            rows.append(row)
            emit("steps", row, fmt_step(row))
            # dynamo's caches hold the previous variant's modules; drop them before the next one is built
            torch._dynamo.reset()
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
    return rows


def run_step(build, kernels, comp, iters, autocast):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, bs = build(kernels, comp)
        # SD1.5 in bf16: fp32 master weights under autocast, the teacher's weights in bf16
        step = (lambda: _autocast_step(trainer)) if autocast else trainer.train_step
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()  # first step: compilation and autotuning, reported separately
        sync(DEV)
        first = time.perf_counter() - t0
        step()  # warm-up (CUDA graphs record on their second call)
        times = []
        for _ in range(iters):  # each step synchronised on its own: the median is robust to a slow outlier
            t0 = time.perf_counter()
            step()
            sync(DEV)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
    out = {"samples_per_s": bs / sec, "ms_per_step": sec * 1e3, "ms_per_step_all": [t * 1e3 for t in times],
           "first_step_s": first, "batch": bs,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if CUDA else "n/a"}
    out["profile"] = step_profile(step, DEV)  # after the timed steps and the peak-memory reading: not in either
    if comp:
        failed = [c for c in [trainer.gen, *trainer.compiled_nets] if not c.active]
        out["compiled"] = not failed
        if failed:
            out["compile_error"] = "; ".join(f"{c.name}: {c.error}" for c in failed)
    out["warnings"] = sorted({str(w.message)[:120] for w in caught})[:3]
    return out


def _autocast_step(trainer):
    with torch.autocast(DEV.type, torch.bfloat16):
        return trainer.train_step()


def fmt_step(r):
    head = f"| {r['model']} | {r['variant']} |"
    if "skipped" in r or "error" in r:
        return f"{head} {r.get('skipped') or 'error: ' + r['error']} | | | | | |"
    mem = r["peak_mem_gb"] if isinstance(r["peak_mem_gb"], str) else f"{r['peak_mem_gb']:.2f}"
    comp = "" if "compiled" not in r else (" (compiled)" if r["compiled"] else f" (fell back: {r['compile_error']})")
    sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "n/a"
    pr = r["profile"]
    return (f"{head} {r['samples_per_s']:.1f} | {sp} | {r['ms_per_step']:.1f} | {mem} | "
            f"{pr['kernels']} / {pr['syncs']} / {pr['host_device_copies']} | {r['first_step_s']:.1f}{comp} |")


RESULT: dict = {"kernels": [], "steps": []}


def emit(kind: str, row: dict, line: str):
    """Prints a row and rewrites the JSON with every row so far, so a run cut short keeps what it measured."""
    print(line, flush=True)
    RESULT[kind].append(row)
    if ARGS.json:
        Path(ARGS.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.json).write_text(json.dumps(RESULT, indent=2))


def main():
    dtype = getattr(torch, ARGS.dtype)
    if CUDA and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here; run with --device cpu (or auto)")
    machine = torch.cuda.get_device_name() if CUDA else f"{platform.processor() or platform.machine()} CPU"
    iters = ARGS.iters or (50 if CUDA else 3)
    step_iters = ARGS.step_iters or (20 if CUDA else 5)
    import triton
    print(f"# bench/throughput.py on {machine}; torch {torch.__version__}, triton {triton.__version__}, "
          f"{'interpreter' if os.environ.get('TRITON_INTERPRET') == '1' else 'compiled'} Triton, inputs {ARGS.dtype}")
    copy_gbs = copy_bandwidth(DEV)
    print(f"device copy bandwidth (read + write): {copy_gbs:.1f} GB/s\n")
    RESULT.update({
        "command": " ".join(["python"] + sys.argv), "device": machine, "torch": torch.__version__,
        "triton": triton.__version__, "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "dtype": ARGS.dtype, "copy_gb_s": copy_gbs, "kernel_iters": iters, "step_iters": step_iters})
    if CUDA:
        p = torch.cuda.get_device_properties(DEV)
        RESULT["device_props"] = {"sm_count": p.multi_processor_count, "memory_gb": p.total_memory / 1e9,
                                  "l2_mb": getattr(p, "L2_cache_size", 0) / 1e6, "capability": f"{p.major}.{p.minor}"}
    if not ARGS.no_kernels:
        print("| shape | op | impl | ms | vs eager | wall ms | wall vs eager | launches | MB moved (min) | GB/s | "
              "of copy BW | kernels' ms | kernels' share of copy BW |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        kernel_rows(copy_gbs, dtype, iters)
    if not ARGS.no_step:
        print("\n| model | variant | samples/s | vs eager | ms/step | peak mem GB | kernels / syncs / copies per step "
              "| first step s |\n|---|---|---|---|---|---|---|---|")
        step_rows(step_iters)
    if ARGS.json:
        print(f"\nwrote {ARGS.json}")


if __name__ == "__main__":
    main()
