"""DeepSpeed ZeRO-3 engine (engine/zero.py): 2 CPU processes on gloo, started by the `deepspeed` launcher,
on a tiny random teacher. Partitioning, parity with one process, kill-and-resume, the non-finite guard, and
the exported generator under stock diffusers."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_config_cli import run

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEPS = 6


@pytest.fixture(scope="module")
def needs_deepspeed():
    """Only the tests that launch DeepSpeed or read its checkpoints need it; the config checks, one-line errors and
    the one-process run below do not, and run without it."""
    return pytest.importorskip("deepspeed")


def _cfg(tmp_path, teacher_dir, pairs_dir, zero=True, **train):
    cfg = {"name": "z3", "model": {"kind": "unet", "teacher": str(teacher_dir)},
           "data": {"num_pairs": 24, "pair_steps": 3, "shard_size": 12, "pair_batch_size": 12,
                    "pairs_dir": str(pairs_dir)},
           "train": {"batch_size": 8, "reg_batch_size": 4, "max_steps": STEPS, "lpips_backbone": "random",
                     "log_every": 1, "sample_every": 0, "save_every": 2, "threads": 1,
                     "fake_updates_per_generator": 2, **train},  # two-time-scale: more forwards per step
           "eval": {"num_samples": 20},
           "deepspeed": {"enabled": zero, "keep_checkpoints": 2}}
    p = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.json')))}.json"
    p.write_text(json.dumps(cfg))
    return p


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


SHM = Path("/dev/shm")
SHM_BUFFERS = "deepspeed_allreduce_buffer_*"  # DeepSpeed's CPU all-reduce files, never unlinked by DeepSpeed


def launch(cfg, out, *extra, env=None, procs=2, timeout=600):
    return launch_script("engine/train.py", "--config", cfg, "--out", out, "--quiet", *extra, env=env, procs=procs,
                         timeout=timeout)


def launch_script(script, *args, env=None, procs=2, timeout=600):
    """`deepspeed --num_gpus procs script args` (CPU processes on gloo here); the ranks die with the launcher."""
    port = _free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(procs), "--master_port", port, str(script), *map(str, args)]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # kill the ranks too: killing only the launcher leaves them running, starving every later test
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    leaked = list(SHM.glob(f"{SHM_BUFFERS}_{port}_*"))
    for f in leaked:
        f.unlink()
    assert not leaked, f"the run left {len(leaked)} DeepSpeed shared-memory buffers in {SHM}: {leaked}"
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


@pytest.fixture(scope="module", autouse=True)
def no_shared_memory_left_behind():
    """One-process runs pick their own port; this catches their buffers (69 MB of RAM each until reboot)."""
    before = set(SHM.glob(SHM_BUFFERS))
    yield
    leaked = set(SHM.glob(SHM_BUFFERS)) - before
    for f in leaked:
        f.unlink()
    assert not leaked, f"runs left DeepSpeed shared-memory buffers in {SHM}: {sorted(leaked)}"


def _log(out):
    return [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def _generator_weights(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "generator" / "unet" / "diffusion_pytorch_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def pairs_dir(tiny_teacher_dir, tmp_path_factory):
    """Pairs made once by the single-process path and shared by every run here."""
    tmp = tmp_path_factory.mktemp("pairs")
    cfg = _cfg(tmp, tiny_teacher_dir, tmp / "pairs", zero=False)
    r = run("engine/make_pairs.py", "--config", str(cfg), "--out", str(tmp / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "pairs"


@pytest.fixture(scope="module")
def reference_run(needs_deepspeed, tiny_teacher_dir, pairs_dir, tmp_path_factory):
    """An uninterrupted 2-process ZeRO-3 run of STEPS steps (checkpoints at 2 and 4 and at the end)."""
    tmp = tmp_path_factory.mktemp("z3ref")
    cfg = _cfg(tmp, tiny_teacher_dir, pairs_dir)
    r = launch(cfg, tmp / "run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return tmp / "run"


def test_each_rank_holds_half_of_each_model(reference_run):
    assert list((reference_run / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars were written
    counts = json.loads((reference_run / "partition.json").read_text())
    assert len(counts) == 2
    for name in ("teacher", "generator", "fake"):
        local = [c[name][0] for c in counts]
        total = counts[0][name][1]
        assert total > 100_000
        for n in local:  # ZeRO-3 pads each parameter to a multiple of the world size: within a few elements
            assert abs(n - total / 2) <= 0.01 * total, (name, local, total)


def test_losses_match_one_process_at_the_same_global_batch(reference_run, tiny_teacher_dir, pairs_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs_dir, zero=False)
    r = run("engine/train.py", "--config", str(cfg), "--out", str(tmp_path / "one"), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = _log(tmp_path / "one"), _log(reference_run)
    assert [l["step"] for l in two] == list(range(1, STEPS + 1))
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["engine"] == "deepspeed-zero3"
    assert len(summary["peak_mem_mib_per_rank"]) == 2
    # stated tolerance: 1e-4 relative (+1e-7 absolute); only float summation order differs
    for a, b in zip(one, two):
        for k in ("loss_dm", "loss_reg", "loss_fake", "loss_g", "grad_norm_g", "grad_norm_f"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (a["step"], k, a[k], b[k])
    assert max(l["loss_dm"] for l in two) > 0  # the comparison is not vacuous: the DM loss moved off zero
    # and the trained generators agree
    assert _max_diff(_generator_weights(tmp_path / "one"), _generator_weights(reference_run)) < 1e-4


def test_micro_batches_match_the_whole_batch(reference_run, tiny_teacher_dir, pairs_dir, tmp_path):
    """train.micro_batch_size 1: each rank's 4 generator samples and 2 pairs run one at a time, their gradients
    accumulated by ZeRO-3 into one update; the run equals the whole-batch reference within fp32 round-off."""
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs_dir, micro_batch_size=1)
    r = launch(cfg, tmp_path / "micro")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    whole, micro = _log(reference_run), _log(tmp_path / "micro")
    for a, b in zip(whole, micro):
        for k in ("loss_dm", "loss_reg", "loss_fake", "loss_g", "grad_norm_g", "grad_norm_f"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (a["step"], k, a[k], b[k])
    assert _max_diff(_generator_weights(reference_run), _generator_weights(tmp_path / "micro")) < 1e-4


def test_sigkill_mid_training_and_during_save_then_resume(reference_run, tiny_teacher_dir, pairs_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs_dir)
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 1. SIGKILL at step 3 (after the checkpoint at step 2)
    r = launch(cfg, out, env={"DMD_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    # 2. resume from step 2, SIGKILL while writing the checkpoint of step 4: `latest` still names step 2
    r = launch(cfg, out, "--resume", env={"DMD_TEST_KILL_IN_SAVE": "4"})
    assert r.returncode != 0
    assert (ckpts / "step_000004" / "generator").is_dir()  # the partial tag was really being written
    assert not (ckpts / "step_000004" / "trainer_rank0.pt").exists()
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    # 3. resume again: from step 2 to the end
    r = launch(cfg, out, "--resume")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_000004", "step_000006"]  # keep 2
    # stated tolerance: 1e-6 absolute on every weight (same seeds, same order of operations)
    assert _max_diff(_generator_weights(out), _generator_weights(reference_run)) < 1e-6
    assert _log(out)[-1]["loss_g"] == pytest.approx(_log(reference_run)[-1]["loss_g"], rel=1e-6)


def test_sigterm_to_the_job_stops_every_rank_with_a_checkpoint_then_resume(needs_deepspeed, tiny_teacher_dir, pairs_dir,
                                                                           tmp_path):
    """What a scheduler does on preemption: SIGTERM to every process of the job. The ranks agree on one step,
    write a complete checkpoint, and `--resume` continues from it."""
    from test_attacks import _wait_for_step
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs_dir, max_steps=10_000, save_every=0)
    out = tmp_path / "run"
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", _free_port(), "engine/train.py", "--config", str(cfg),
           "--out", str(out), "--quiet"]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            _wait_for_step(out / "log.jsonl", p, 3, timeout=600)
            os.killpg(p.pid, signal.SIGTERM)
            stdout, stderr = p.communicate(timeout=300)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert "stopped by SIGTERM" in stdout and "checkpoint written" in stdout, (stdout + stderr)[-3000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    step = int(tag.removeprefix("step_"))
    assert step >= 3 and all((out / "checkpoints" / tag / f"trainer_rank{r}.pt").is_file() for r in (0, 1))
    r = launch(cfg, out, "--resume", "--max-steps", str(step + 1))
    assert r.returncode == 0 and f"resumed at step {step}" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 1


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    part = out / "checkpoints" / "step_000006" / "fake" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part.write_bytes(part.read_bytes()[:1000])  # truncated
    r = launch(out / "config.json", out, "--resume")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "checkpoint" in r.stderr and "step_000006 skipped" in r.stderr and "resumed at step 4" in r.stdout
    assert _max_diff(_generator_weights(out), _generator_weights(reference_run)) < 1e-6  # steps 5, 6 again


@pytest.mark.parametrize("victim", ["generator/zero_pp_rank_0_mp_rank_00_model_states.pt",
                                    "fake/zero_pp_rank_1_mp_rank_00_optim_states.pt", "trainer_rank0.pt"])
def test_a_pickle_payload_in_any_checkpoint_file_is_refused_without_running(reference_run, tmp_path, victim):
    """DeepSpeed's own reader would unpickle anything; ours reads tensors only. The attacker here also rewrote the
    checksum record, so only the reader stands between the file and the code in it."""
    import shutil
    from engine.files import write_digests
    out, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(reference_run, out)
    tag = out / "checkpoints" / "step_000006"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"module": Payload(), "step": Payload()}, tag / victim)
    for rank in (0, 1):
        mine = [*tag.glob(f"*/zero_pp_rank_{rank}_mp_rank_*"), tag / f"trainer_rank{rank}.pt"]
        write_digests(tag, mine, f"checksums_rank{rank}.json")
    r = launch(out / "config.json", out, "--resume")
    assert r.returncode != 0 and "cannot be read as tensors" in r.stderr, (r.stdout + r.stderr)[-3000:]
    assert not marker.exists()


def test_generator_ema_matches_one_process_and_survives_resume(needs_deepspeed, tiny_teacher_dir, pairs_dir, tmp_path):
    """Generator EMA under ZeRO-3 (fp32 shadows of each rank's partitions): the exported generator is the EMA,
    equal to the single-process EMA, and a run killed and resumed ends with the same EMA."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    opts = dict(ema_decay=0.5, lr_generator=1e-3, lr_fake=1e-3, max_steps=4, fake_updates_per_generator=1)
    z3, one, res = tmp_path / "z3", tmp_path / "one", tmp_path / "res"
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs_dir, **opts)
    # parameters under 2000 elements (biases, norms, small convs) stay whole on each rank: the EMA swaps both kinds
    r = launch(cfg, z3, "--set", "deepspeed.persistence_threshold=2000")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_teacher_dir, pairs_dir, zero=False, **opts)),
            "--out", str(one), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    ema = _generator_weights(z3)
    assert _max_diff(ema, _generator_weights(one)) < 1e-4  # the parity tolerance above
    raw = get_fp32_state_dict_from_zero_checkpoint(str(z3 / "checkpoints" / "step_000004"), tag="generator")
    raw = {k[len("denoiser.net."):]: v for k, v in raw.items()}
    assert _max_diff(raw, ema) > 1e-3  # the export is not the raw generator: the comparison above can fail
    # the final samples are the EMA's too: one-level rounding flips only (about 1 % of pixels here; sampling the
    # raw generator instead differs by up to 9 levels in 85 %)
    with np.load(z3 / "samples.npz") as a, np.load(one / "samples.npz") as b:
        diff = np.abs(a["images"].astype(int) - b["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.03, (diff.max(), (diff > 0).mean())
    r = launch(cfg, res, "--set", "deepspeed.persistence_threshold=2000", env={"DMD_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0
    r = launch(cfg, res, "--set", "deepspeed.persistence_threshold=2000", "--resume")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert _max_diff(_generator_weights(res), ema) < 1e-6  # the EMA came back from the checkpoint


def test_planted_nonfinite_step_is_skipped_by_both_models(needs_deepspeed, tiny_teacher_dir, pairs_dir, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs_dir, save_every=1, max_consecutive_skips=2)
    cfg_d = json.loads(cfg.read_text())
    cfg_d["deepspeed"]["keep_checkpoints"] = 10
    cfg.write_text(json.dumps(cfg_d))
    out = tmp_path / "run"
    r = launch(cfg, out, "--max-steps", "4", env={"DMD_TEST_NAN_AT_STEP": "2"})  # the 3rd update (step 2 -> 3)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    log = _log(out)
    assert [l["skipped"] for l in log] == [0, 0, 1, 0] and log[-1]["skipped_total"] == 1

    def weights(step, model):
        return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / f"step_{step:06d}"), tag=model)

    for model in ("generator", "fake"):
        assert _max_diff(weights(2, model), weights(3, model)) == 0, model  # the skipped step changed nothing
        assert _max_diff(weights(3, model), weights(4, model)) > 0, model   # the next one trained again


def test_consecutive_nonfinite_steps_stop_the_run(tiny_teacher_dir, pairs_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs_dir, zero=False, save_every=1, max_consecutive_skips=2)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "DMD_TEST_NAN_AT_STEP": "2-"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "2 non-finite steps in a row" in r.stderr and "train.max_consecutive_skips" in r.stderr
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["models"]["generator"].values())


def test_exported_generator_samples_the_same_with_stock_diffusers(reference_run):
    from diffusers import EDMEulerScheduler, UNet2DModel
    from engine.sampling import to_uint8
    from engine.sampling import balanced_labels
    unet = UNet2DModel.from_pretrained(reference_run / "generator" / "unet").eval()
    sched = EDMEulerScheduler.from_pretrained(reference_run / "generator" / "scheduler")
    with np.load(reference_run / "samples.npz") as f:
        want, labels = f["images"], f["labels"]
    n = len(want)
    z = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(12345))  # train.py's final draw
    assert (balanced_labels(n, 10).numpy() == labels).all()
    sigma = torch.tensor(sched.config.sigma_max)
    x = sigma * z
    with torch.no_grad():
        out = unet(sched.precondition_inputs(x, sigma), sched.precondition_noise(sigma).expand(n),
                   class_labels=torch.as_tensor(labels)).sample
    got = to_uint8(sched.precondition_outputs(x, out, sigma))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_bf16_with_fp32_master_weights_runs_on_cpu(needs_deepspeed, tiny_teacher_dir, pairs_dir, tmp_path):
    """precision bf16 (bf16 compute, fp32 master weights) with a bf16 teacher: the GPU default ("auto"),
    forced here onto DeepSpeed's CPU accelerator with gloo."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import UNet2DModel
    from safetensors.torch import load_file
    cfg = _cfg(tmp_path, tiny_teacher_dir, pairs_dir, max_steps=3, save_every=1)
    out, res = tmp_path / "run", tmp_path / "res"
    bf16 = ("--set", "deepspeed.precision=bf16", "--set", "deepspeed.teacher_dtype=bf16")
    r = launch(cfg, out, *bf16)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    log = _log(out)
    assert [l["step"] for l in log] == [1, 2, 3] and log[-1]["skipped_total"] == 0
    for l in log:
        for k in ("loss_dm", "loss_reg", "loss_fake", "loss_g", "grad_norm_g", "grad_norm_f"):
            assert np.isfinite(l[k]), (l["step"], k, l[k])
    # the working copies ZeRO-3 partitions (the teacher's only copy) are bf16 on every rank
    for counts in json.loads((out / "partition.json").read_text()):
        assert {k: c[2] for k, c in counts.items()} == {"teacher": "bfloat16", "generator": "bfloat16", "fake": "bfloat16"}
    teacher = load_file(str(tiny_teacher_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    ckpt = out / "checkpoints" / "step_000003"
    for model, prefix in (("generator", "denoiser.net."), ("fake", "net.")):
        for rank in (0, 1):  # the optimiser's master partitions are fp32
            s = torch.load(ckpt / model / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
            groups = s["optimizer_state_dict"]["fp32_flat_groups"]
            assert groups and all(t.dtype == torch.float32 for t in groups), model
        master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=model)
        master = {k[len(prefix):]: v for k, v in master.items()}
        assert master.keys() <= teacher.keys() and len(master) > 10, model
        assert all(v.dtype == torch.float32 for v in master.values()), model
        # trained away from their start (the teacher rounded to bf16), by updates bf16 alone could not hold
        assert _max_diff(master, {k: teacher[k].bfloat16() for k in master}) > 0, model
        assert any((v != v.bfloat16().float()).any() for v in master.values()), model
    unet = UNet2DModel.from_pretrained(out / "generator" / "unet").eval()  # the exported generator
    exported = _generator_weights(out)
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    assert _max_diff(dict(unet.state_dict()), exported) == 0
    with torch.no_grad():
        y = unet(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), class_labels=torch.tensor([0, 1])).sample
    assert torch.isfinite(y).all()
    # a bf16 run killed after its step-1 checkpoint and resumed ends where the uninterrupted one did
    r = launch(cfg, res, *bf16, env={"DMD_TEST_KILL_AT_STEP": "2"})
    assert r.returncode != 0 and (res / "checkpoints" / "latest").read_text().strip() == "step_000001"
    r = launch(cfg, res, *bf16, "--resume")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert _max_diff(_generator_weights(res), exported) < 1e-6
    for model in ("generator", "fake"):  # the fp32 masters too, not only their bf16 copies
        a = get_fp32_state_dict_from_zero_checkpoint(str(res / "checkpoints" / "step_000003"), tag=model)
        assert _max_diff(a, get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=model)) < 1e-6, model


# --- configs and one-line errors (no processes launched) ----------------------------------------------------
def test_shipped_zero3_configs_parse():
    from engine.config import DMDConfig, load
    cfg = load(ROOT / "configs" / "digits_zero3.json", DMDConfig)
    assert cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3 and cfg.train.batch_size % 2 == 0
    assert load(ROOT / "configs" / "sd15_zero3.json", DMDConfig).deepspeed.gradient_checkpointing


def test_bad_deepspeed_key_is_one_line(tmp_path):
    r = run("engine/train.py", "--config", "configs/digits_zero3.json", "--out", str(tmp_path / "r"),
            "--set", "deepspeed.offload=true")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "deepspeed: unknown key 'offload'" in r.stderr
    r = run("engine/train.py", "--config", "configs/digits_zero3.json", "--out", str(tmp_path / "r"),
            "--set", "deepspeed.zero_stage=2")
    assert r.returncode == 2 and "deepspeed.zero_stage must be one of 3, got 2" in r.stderr, r.stderr
    r = run("engine/train.py", "--config", "configs/digits_zero3.json", "--out", str(tmp_path / "r"),
            "--set", "train.compile=true")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "train.compile is not supported with deepspeed.enabled" in r.stderr


def test_sd15_config_names_what_is_missing(needs_deepspeed, tmp_path):
    """The shipped SD1.5 config needs the user's SD1.5 folder and caption file; each absence is one line."""
    r = run("engine/train.py", "--config", "configs/sd15_zero3.json", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "model.teacher: folder 'models/stable-diffusion-v1-5' not found" in r.stderr


def test_several_processes_need_deepspeed_enabled(tmp_path):
    r = subprocess.run([sys.executable, "engine/train.py", "--config", "configs/digits.json", "--out",
                        str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WORLD_SIZE": "2"})
    assert r.returncode == 2 and "deepspeed.enabled is false" in r.stderr, r.stderr
