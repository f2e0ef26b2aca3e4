"""The trainer's hot path: the Triton kernels (tests/test_kernels.py) and torch.compile inside real training
steps, each against the eager path, and compile's fallbacks."""
import functools
import os
import warnings

import pytest
import torch
from kernel_devices import CUDA, DEVICES


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
