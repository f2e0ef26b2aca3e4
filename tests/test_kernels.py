"""Triton kernels (kernels/) against the engine's references: engine.losses for the DM loss, the noise schedule
(and the kernel's own fp32-then-round numerics, written out below) for noise injection.

Without CUDA the kernels run in Triton's CPU interpreter. triton.jit picks the interpreter when a kernel module is
imported, so TRITON_INTERPRET is set here before kernels.* is imported (torch itself does not import triton).
"""
import functools
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from engine.losses import distribution_matching_loss, dm_gradient  # noqa: E402
from kernels import dmd, noise, runs_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not runs_triton(dmd._dmd_stats_kernel, torch.empty(0)),
                                                 reason="kernels were imported without TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]
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


# --- engine integration ------------------------------------------------------------------------------------------
@pytest.fixture
def exact_cuda():
    """Two trainers compared on a GPU must see the same convolutions: cuDNN's default algorithms may be
    non-deterministic (atomics in weight gradients) and use TF32, so a comparison measures cuDNN, not the hot path."""
    if not CUDA:
        yield
        return
    b = torch.backends
    saved = b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
    b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, False, False, False
    yield
    b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


def _trainer(teacher_dir, kernels, device="cpu", **train):
    from engine.plain import PlainBackend
    from engine.config import DMDConfig, parse
    from engine.trainer import DMDTrainer
    cfg = parse(DMDConfig, {"model": {"kind": "unet", "teacher": str(teacher_dir)},
                            "train": {"batch_size": 5, "reg_weight": 0.0, "kernels": kernels, **train},
                            # fp32 on a GPU too: these compare paths at fp32 tolerances ("auto" would be bf16 there)
                            "deepspeed": {"precision": "fp32", "teacher_dtype": "fp32"}})
    return DMDTrainer(PlainBackend(cfg, device), cfg.train, seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_trainer_triton_path_matches_eager(tiny_teacher_dir, guidance, device, exact_cuda):
    eager = _trainer(tiny_teacher_dir, "eager", device, real_guidance=guidance)
    # on CUDA the default ("auto") must pick the kernels; on CPU they are asked for (interpreter)
    fused = _trainer(tiny_teacher_dir, "auto" if device == "cuda" else "triton", device, real_guidance=guidance)
    assert eager.ops.name == "eager" and fused.ops.name == "triton"
    for _ in range(2):  # the second step starts from weights the first step changed
        le, lf = eager.train_step(), fused.train_step()
        assert le.keys() == lf.keys() and "loss_dm" in le and "loss_fake" in le
        for k in le:
            assert lf[k] == pytest.approx(le[k], rel=1e-4, abs=1e-7), k
    for pe, pf in zip(eager.m.generator.parameters(), fused.m.generator.parameters()):
        torch.testing.assert_close(pf, pe, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("scope", ["generator", "all"])
def test_trainer_compile_on_cuda_is_active_and_matches_eager(tiny_teacher_dir, scope, exact_cuda):
    """On a GPU torch.compile must really compile (no fallback), and agree with eager (fp32, tolerance 1e-3)."""
    eager = _trainer(tiny_teacher_dir, "eager", "cuda", real_guidance=2.0)
    comp = _trainer(tiny_teacher_dir, "eager", "cuda", real_guidance=2.0, compile=True, compile_scope=scope)
    for _ in range(3):  # CUDA graphs: the third step replays graphs recorded in the second
        le, lc = eager.train_step(), comp.train_step()
    assert comp.gen.active, comp.gen.error
    assert len(comp.compiled_nets) == (2 if scope == "all" else 0)
    assert all(c.active for c in comp.compiled_nets), [c.error for c in comp.compiled_nets]
    for k in le:
        assert lc[k] == pytest.approx(le[k], rel=1e-3, abs=1e-6), k
    for pe, pc in zip(eager.m.generator.parameters(), comp.m.generator.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-3, atol=1e-5)


def test_compile_scope_all_routes_teacher_and_fake_through_compile(tiny_teacher_dir, monkeypatch):
    """compile_scope "all": the teacher's and fake score's networks are called through torch.compile; when that
    fails lazily (first call), each model warns once, by name, and the step equals the eager one."""
    def lazily_broken(module, **kw):
        def call(*a, **k):
            raise RuntimeError("no compiler here")
        return call

    eager = _trainer(tiny_teacher_dir, "eager", real_guidance=2.0)
    monkeypatch.setattr(torch, "compile", lazily_broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comp = _trainer(tiny_teacher_dir, "eager", real_guidance=2.0, compile=True, compile_scope="all")
        le, lc = eager.train_step(), comp.train_step()
        lc2 = comp.train_step()
    msgs = [str(w.message) for w in caught if "torch.compile of the" in str(w.message)]
    assert sorted(m.split(" failed")[0] for m in msgs) == [
        "torch.compile of the fake score", "torch.compile of the generator", "torch.compile of the teacher"], msgs
    assert not comp.gen.active and not any(c.active for c in comp.compiled_nets)
    assert comp.m.teacher.net_call is comp.compiled_nets[0] and comp.m.generator.denoiser.net_call is None
    for k in le:
        assert lc[k] == pytest.approx(le[k], rel=1e-6, abs=1e-9), k
    assert lc2["loss_g"] > 0


def test_compile_scope_all_traces_each_network(tiny_teacher_dir, monkeypatch):
    """The same with a working compiler: dynamo traces all three networks (the "eager" backend, so no inductor
    build on CPU), nothing falls back, and the steps equal the eager ones."""
    real_compile = torch.compile
    eager = _trainer(tiny_teacher_dir, "eager", real_guidance=2.0)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager", dynamic=False))
    comp = _trainer(tiny_teacher_dir, "eager", real_guidance=2.0, compile=True, compile_scope="all")
    for _ in range(2):
        le, lc = eager.train_step(), comp.train_step()
        for k in le:
            assert lc[k] == pytest.approx(le[k], rel=1e-5, abs=1e-8), k
    assert comp.gen.active and all(c.active for c in comp.compiled_nets), \
        [c.error for c in [comp.gen, *comp.compiled_nets]]


def test_trainer_rejects_unknown_kernels_choice(tiny_teacher_dir):
    from engine.errors import DMDError
    with pytest.raises(DMDError, match="train.kernels"):
        _trainer(tiny_teacher_dir, "cuda")


def test_compile_fallback_is_eager_with_a_warning():
    from engine.compile import CompiledModule

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    wrapped = CompiledModule(net, "default", "cpu", backend=broken_backend)
    z = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="continues eagerly"):
        out = wrapped(z)
    assert not wrapped.active and "no compiler here" in wrapped.error
    torch.testing.assert_close(out, net(z))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every step
        wrapped(z).sum().backward()


@functools.cache
def _inductor_unavailable() -> str | None:
    """Why torch.compile (inductor) cannot compile and run a trivial function, forward and backward, on this machine
    (no C compiler, ...), or None when it can. Probed here, independently of engine.compile: where compilation
    demonstrably works, CompiledModule must use it, not quietly fall back to eager."""
    try:
        f = torch.compile(lambda a: (a.sin() * 2).sum(), backend="inductor", dynamic=False)
        a = torch.randn(4, requires_grad=True)
        f(a).backward()
        torch.testing.assert_close(a.grad, 2 * a.detach().cos())
    except Exception as e:  # noqa: BLE001 - any failure: this machine cannot compile
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def _require_inductor():
    why = _inductor_unavailable()
    if why is not None:
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {why}")
    from torch._dynamo.utils import counters
    counters.clear()  # so a test's count of compiled graphs is its own
    return counters


def test_compile_small_module_is_compiled_and_matches_eager():
    from engine.compile import CompiledModule
    counters = _require_inductor()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
    z = torch.randn(5, 6)
    wrapped = CompiledModule(net, "auto", "cpu")
    wrapped(z).square().mean().backward()
    g_comp = [p.grad.clone() for p in net.parameters()]
    # compiled, not the eager fallback: no error recorded, and dynamo really traced the module
    assert wrapped.active, wrapped.error
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])
    net.zero_grad()
    net(z).square().mean().backward()
    for a, b in zip(g_comp, net.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DMD_SLOW_TESTS") != "1", reason="~3 min of inductor compilation on 2 CPU cores; "
                    "set DMD_SLOW_TESTS=1")
def test_trainer_compile_on_cpu_is_active_and_matches_eager(tiny_teacher_dir):
    counters = _require_inductor()
    eager = _trainer(tiny_teacher_dir, "eager")
    comp = _trainer(tiny_teacher_dir, "eager", compile=True)
    le, lc = eager.train_step(), comp.train_step()
    assert comp.gen.active, comp.gen.error  # where inductor works, the generator must really be compiled
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])
    for k in le:
        assert lc[k] == pytest.approx(le[k], rel=1e-3, abs=1e-6), k
    for pe, pc in zip(eager.m.generator.parameters(), comp.m.generator.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-3, atol=1e-5)


def test_compiled_module_builds_schedule_tables_before_compiling(tiny_teacher_dir, monkeypatch):
    """Built inside the first compiled call, the schedule's device tables would be outputs of a CUDA graph that
    its next replay overwrites (seen on an H200 with compile_scope "all"): they must exist before torch.compile."""
    from engine.compile import CompiledModule
    seen = {}

    def record(module, **kw):
        seen["tables"] = dict(module.denoiser.schedule._tables)
        return module

    trainer = _trainer(tiny_teacher_dir, "eager")
    gen = trainer.m.generator
    gen.denoiser.schedule._tables.clear()
    monkeypatch.setattr(torch, "compile", record)
    CompiledModule(gen, "default", "cpu")
    assert list(seen["tables"]) == [torch.device("cpu")]
