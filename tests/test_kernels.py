"""Triton kernels (kernels/) against the engine's references: engine.losses for the DM loss, the noise schedule
(and the kernel's own fp32-then-round numerics, written out below) for noise injection. Without CUDA the kernels
run in Triton's CPU interpreter (tests/kernel_devices.py switches it on before kernels.* is imported). The
trainer's use of them and of torch.compile: tests/test_hotpath.py.
"""
import os

import pytest
import torch
from kernel_devices import DEVICES, triton

from engine.losses import distribution_matching_loss, dm_gradient
from kernels import dmd, noise, runs_triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-15),
       # the interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest: allow one bf16 ulp
       torch.bfloat16: dict(rtol=1e-2, atol=1e-6)}


def _inputs(shape, dtype, device, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(n)]


def _with_bad_samples(x, pr, pf):
    pr[1] = x[1]                      # normaliser exactly zero
    pf[2, 0, 3, 5] = float("nan")     # a NaN prediction
    return x, pr, pf


# --- DMD loss ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [3, 4])
def test_dmd_loss_matches_engine_loss(device, dtype, channels):
    x, pr, pf = _with_bad_samples(*_inputs((3, channels, 17, 23), dtype, device))
    assert runs_triton(dmd._dmd_stats_kernel, x)  # the kernel, not the fallback, is under test
    xk, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lk, lr = dmd.dmd_loss(xk, pr, pf), distribution_matching_loss(xr, pr, pf)
    (2.5 * lk).backward()
    (2.5 * lr).backward()
    assert lk.dtype == lr.dtype and lk.shape == lr.shape == ()
    assert xk.grad.dtype == dtype and torch.isfinite(lk) and torch.isfinite(xk.grad).all()
    torch.testing.assert_close(lk, lr, **({**TOL[dtype], "rtol": 1e-5} if dtype == torch.bfloat16 else TOL[dtype]))
    torch.testing.assert_close(xk.grad, xr.grad, **TOL[dtype])
    assert torch.count_nonzero(xk.grad[1:]) == 0 and torch.count_nonzero(xk.grad[0]) > 0.99 * xk.grad[0].numel()


@pytest.mark.parametrize("device", DEVICES)
def test_dmd_loss_classifier_free_guidance(device):
    x, cond, uncond, pf = _inputs((3, 4, 17, 23), torch.float32, device, n=4)
    s = 3.5
    xk, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lk = dmd.dmd_loss(xk, cond, pf, pred_uncond=uncond, guidance_scale=s)
    lr = distribution_matching_loss(xr, uncond + s * (cond - uncond), pf)
    lk.backward()
    lr.backward()
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=0)
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_dmd_split_reduction_and_block_loop(device):
    """Several programs per sample and several loop iterations per program give the one-program answer."""
    x, pr, pf = _with_bad_samples(*_inputs((3, 3, 17, 23), torch.float64, device))
    inv1, loss1 = dmd.dmd_stats(x, pr, pf)
    inv3, loss3 = dmd.dmd_stats(x, pr, pf, split=3, block=64)  # 1173 = 3 chunks of 448 = 7 blocks of 64
    torch.testing.assert_close(inv3, inv1, rtol=1e-13, atol=0)
    torch.testing.assert_close(loss3, loss1, rtol=1e-13, atol=0)
    ref = dm_gradient(x, pr, pf)
    norm = (x - pr).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(inv1, torch.tensor([1 / norm[0].item(), 0.0, 0.0], dtype=torch.float64, device=device))
    torch.testing.assert_close(loss1, 0.5 * ref.square().mean(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_dmd_rejects_inf_and_overflow_and_all_bad_batch(device):
    x, pr, pf = _inputs((4, 3, 5, 7), torch.float32, device)
    pr[0, 1, 2, 3] = float("inf")       # infinite real score
    x[1, 0, 0, 0] = float("nan")        # NaN sample: NaN normaliser
    pr[2], x[2] = 0.0, 1e-37            # finite everything, tiny normaliser ...
    pf[2] = 1e5                         # ... so (pf - pr) / norm overflows fp32
    xk = x.clone().requires_grad_(True)
    loss = dmd.dmd_loss(xk, pr, pf)
    loss.backward()
    ref = dm_gradient(x, pr, pf)
    assert torch.count_nonzero(ref[:3]) == 0  # the reference agrees that these three are rejected
    assert torch.count_nonzero(xk.grad[:3]) == 0 and torch.count_nonzero(xk.grad[3]) > 0
    torch.testing.assert_close(loss, 0.5 * ref.square().mean(), rtol=1e-5, atol=0)
    xk = x[:3].clone().requires_grad_(True)
    loss = dmd.dmd_loss(xk, pr[:3], pf[:3])
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(xk.grad) == 0


def test_dmd_loss_rejects_bad_shapes():
    x, pr, pf = _inputs((2, 3, 4, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match="shape"):
        dmd.dmd_loss(x, pr[:1], pf)


# --- noise injection ---------------------------------------------------------------------------------------------
def _noise_reference(x, t, alpha, sigma, eps):
    """The kernel's numerics in plain torch: fp32 (fp64 for fp64 x) maths, one rounding to x's dtype. (The
    engine's NoiseSchedule.add_noise rounds the coefficients to x's dtype first; equal in fp32, checked below.)"""
    ct = torch.promote_types(x.dtype, torch.float32)
    idx = t.to(device=alpha.device, dtype=torch.long)
    shape = (-1,) + (1,) * (x.ndim - 1)
    a = alpha.float()[idx].to(device=x.device, dtype=ct).view(shape)
    s = sigma.float()[idx].to(device=x.device, dtype=ct).view(shape)
    return (a * x.to(ct) + s * eps.to(ct)).to(x.dtype)


def _tables(T=50):
    from models import NoiseSchedule
    return NoiseSchedule.vp(T, 1e-3, 0.2, "linear")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_matches_reference_and_schedule(device, dtype):
    sch = _tables()
    x, eps = _inputs((3, 3, 17, 23), dtype, device, n=2)
    t = torch.tensor([0, 31, 49], device=device)
    xk, ek = x.clone().requires_grad_(True), eps.clone().requires_grad_(True)
    xr, er = x.clone().requires_grad_(True), eps.clone().requires_grad_(True)
    yk = noise.add_noise(xk, t, sch.alpha, sch.sigma, eps=ek)
    yr = _noise_reference(xr, t, sch.alpha, sch.sigma, er)
    torch.testing.assert_close(yk, yr, **TOL[dtype])
    if dtype == torch.float32:  # the engine's own schedule (it rounds coefficients to x's dtype, so fp32 only)
        torch.testing.assert_close(yk, sch.add_noise(x, eps, t), rtol=1e-5, atol=1e-6)
    g = torch.randn(yk.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    yk.backward(g)
    yr.backward(g)
    torch.testing.assert_close(xk.grad, xr.grad, **TOL[dtype])
    torch.testing.assert_close(ek.grad, er.grad, **TOL[dtype])
    assert xk.grad.dtype == ek.grad.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_reproducible_and_gaussian(device):
    sch = _tables()
    x = _inputs((3, 4, 17, 23), torch.float32, device, n=1)[0]
    t = torch.tensor([5, 0, 49], device=device)
    a = noise.add_noise(x, t, sch.alpha, sch.sigma, seed=1234, offset=0)
    b = noise.add_noise(x, t, sch.alpha, sch.sigma, seed=1234, offset=0)
    c = noise.add_noise(x, t, sch.alpha, sch.sigma, seed=1234, offset=x.numel())
    d = noise.add_noise(x, t, sch.alpha, sch.sigma, seed=1235, offset=0)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    # the materialised eps is the one the kernel used, and counters are plain offsets into one stream
    eps = noise.philox_randn(x.shape, 1234, 0, device)
    torch.testing.assert_close(a, _noise_reference(x, t, sch.alpha, sch.sigma, eps), rtol=1e-6, atol=1e-6)
    long = noise.philox_randn((2 * x.numel(),), 1234, 0, device)
    assert torch.equal(long[:x.numel()], eps.flatten())
    torch.testing.assert_close(c, _noise_reference(x, t, sch.alpha, sch.sigma, long[x.numel():].view(x.shape)),
                               rtol=1e-6, atol=1e-6)
    big = noise.philox_randn((200_000,), 7, 0, device).double()
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    assert abs((big ** 3).mean().item()) < 0.03 and abs((big ** 4).mean().item() - 3) < 0.06
    assert abs((big[1:] * big[:-1]).mean().item()) < 0.01  # neighbouring counters are uncorrelated


def test_add_noise_needs_exactly_one_noise_source():
    sch = _tables()
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        noise.add_noise(x, torch.zeros(2, dtype=torch.long), sch.alpha, sch.sigma)


# --- compiled for a GPU without one ------------------------------------------------------------------------------
def compile_all_for_sm90():
    """triton.compile every kernel variant to a cubin for sm_90 (no GPU needed). The interpreter runs the kernels as
    numpy and misses what only the compiler checks (types carried around loops, pointer and constexpr typing)."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    assert not dmd._dmd_stats_kernel.__class__.__name__.startswith("Interpreted")
    done = []
    for ty, acc in (("fp32", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)):
        a = "fp64" if ty == "fp64" else "fp32"
        ptrs = lambda names, t: {n: f"*{t}" for n in names}  # noqa: E731
        cases = [(dmd._dmd_finalize_kernel, {**ptrs(["part_ptr", "inv_ptr", "loss_ptr"], a), "B": "i32",
                  "SPLIT": "i32", "N": "i32", "numel": "i32"}, {"ACC": acc, "BLOCK_B": 256, "BLOCK_S": 4})]
        for cfg in (False, True):
            cases.append((dmd._dmd_stats_kernel, {**ptrs(["x_ptr", "pr_ptr", "pu_ptr", "pf_ptr"], ty),
                          "part_ptr": f"*{a}", "N": "i32", "CHUNK": "i32", "B": "i32", "SPLIT": "i32", "scale": "fp32"},
                          {"HAS_CFG": cfg, "ACC": acc, "BLOCK": 1024}))
            cases.append((dmd._dmd_grad_kernel, {**ptrs(["pr_ptr", "pu_ptr", "pf_ptr", "out_ptr"], ty),
                          **ptrs(["inv_ptr", "go_ptr"], a), "N": "i32", "total": "i32", "scale": "fp32"},
                          {"HAS_CFG": cfg, "ACC": acc, "BLOCK": 1024}))
        for mode in (noise.EPS_NONE, noise.EPS_LOAD, noise.EPS_PHILOX):
            cases.append((noise._noise_kernel, {**ptrs(["x_ptr", "eps_ptr", "out_ptr"], ty), "t_ptr": "*i32",
                          **ptrs(["a_ptr", "s_ptr"], "fp32"), "N": "i32", "seed": "i64", "offset": "i32"},
                          {"EPS_MODE": mode, "ACC": acc, "BLOCK": 1024}))
        if ty == "fp32":
            cases.append((noise._randn_kernel, {"out_ptr": "*fp32", "total": "i32", "seed": "i64", "offset": "i32"},
                          {"BLOCK": 1024}))
        for fn, sig, cx in cases:
            sig.update({k: "constexpr" for k in cx})
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32))
            assert k.asm["cubin"]
            done.append(fn.__name__)
    print(f"compiled {len(done)} kernel variants for sm_90")


def test_kernels_compile_for_sm90(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    code = f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]; " \
           "import test_kernels; test_kernels.compile_all_for_sm90()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled 25 kernel variants" in r.stdout, r.stdout


def test_cpu_without_interpreter_kernels_refuse_and_the_engine_runs_eager():
    import subprocess
    import sys
    from conftest import ROOT
    code = """
import torch
from kernels import dmd, noise, runs_triton
from engine.losses import distribution_matching_loss
from engine import hotpath
assert not runs_triton(dmd._dmd_stats_kernel, torch.empty(0))
x, pr, pf = (torch.randn(2, 3, 5, 5) for _ in range(3))
for call in (lambda: dmd.dmd_loss(x, pr, pf),
             lambda: noise.add_noise(x, torch.zeros(2, dtype=torch.long), torch.ones(4), torch.ones(4), seed=0),
             lambda: noise.add_noise(x, torch.zeros(2, dtype=torch.long), torch.ones(4), torch.ones(4), eps=x)):
    try:
        call()
    except RuntimeError as e:
        assert "TRITON_INTERPRET" in str(e)
    else:
        raise AssertionError("a kernel on CPU without the interpreter must refuse, not fall back")
path = hotpath.select("auto", torch.device("cpu"))
assert path.name == "eager" and path.dm_loss is distribution_matching_loss
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
