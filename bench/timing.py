"""Timing functions for the benchmarks: wall time, device time with L2 cleared, launched kernels and a
profiled step. Each takes the device it measures; on a CPU the device-only figures are None or "n/a"."""
import time

import torch


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, iters: int, dev: torch.device, warmup: int = 2) -> float:
    """Mean seconds per call over `iters` back-to-back calls, synchronised at both ends (launch overhead included)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / iters


def device_time(fn, dev: torch.device) -> float | None:
    """CUDA: median seconds of device time per call (events around each call), with L2 cleared before each call
    (triton.testing.do_bench), so inputs that fit in the 50 MB L2 are still read from memory, as in a training step
    where UNet calls run in between. Elsewhere None: the caller uses timeit's wall time."""
    if dev.type != "cuda":
        return None
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def launches(fn, dev: torch.device):
    """(device kernels launched by one call, their summed device time in ms) from torch.profiler, L2 cleared first.
    The event-timed `ms` column also holds the gaps in which the device waits for the host to launch; the
    kernels' own time is what the bandwidth target is about. CPU: ("n/a", None)."""
    if dev.type != "cuda":
        return "n/a", None
    from torch.profiler import ProfilerActivity, profile
    flush = torch.empty(64 << 20, dtype=torch.int32, device=dev)  # 256 MB, larger than any L2
    fn()  # warm: allocator and autotune caches
    flush.zero_()
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(dev)
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(ev), sum(e.time_range.elapsed_us() for e in ev) / 1e3


def step_profile(step, dev: torch.device) -> dict:
    """One more step under torch.profiler: device kernels launched, host-device syncs and copies (each one stalls
    the host's launch queue), and the ops that take the most time (device time on CUDA, CPU time elsewhere)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = dev.type == "cuda"
    sync(dev)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        sync(dev)
    names = [e.name for e in prof.events()]
    out = {"kernels": sum(e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy")
                          for e in prof.events()) if cuda else "n/a",
           "syncs": sum(n in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize") for n in names),
           "host_device_copies": sum(n.startswith(("Memcpy HtoD", "Memcpy DtoH")) for n in names)}
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(prof.key_averages(), key=lambda a: getattr(a, key, 0), reverse=True)[:8]
    out["top_ops_ms"] = [[a.key, round(getattr(a, key, 0) / 1e3, 3), a.count] for a in top]
    return out


def copy_bandwidth(dev: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write), the ceiling the kernel rows are measured against."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    a = torch.empty(n, device=dev).normal_()
    b = torch.empty_like(a)
    t = device_time(lambda: b.copy_(a), dev) or timeit(lambda: b.copy_(a), 5, dev)
    return 2 * a.numel() * a.element_size() / t / 1e9
