"""bench/gpu_session.sh runs on rare, short GPU loans: its argument handling, its phases and the JSON rows it keeps
are checked here on CPU (bench/throughput.py with --device cpu and one small shape), so the script cannot rot
between loans."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_BENCH = "--device cpu --shapes digits --iters 1 --step-iters 1 --no-compile"
CPU_LATENCY = "--device cpu --models digits --batches 1,2 --providers eager,stock --iters 1"


def _run(tmp_path, *args, **env):
    e = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_PYTHON": sys.executable, "GPU_WHEELS": str(tmp_path / "none"),
         "GPU_BENCH_ARGS": CPU_BENCH, "GPU_LATENCY_ARGS": CPU_LATENCY, **env}
    return subprocess.run(["bash", "bench/gpu_session.sh", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=600)


def test_unknown_phase_is_one_clear_line(tmp_path):
    r = _run(tmp_path, "benchmarks")
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu_session: unknown phase 'benchmarks' (all, tests, latency, kernels or steps)"


def test_kernel_phase_writes_every_row_as_json(tmp_path):
    r = _run(tmp_path, "kernels")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    d = json.loads((tmp_path / "out/throughput_kernels.json").read_text())
    assert d["device"].endswith("CPU") and d["triton_interpret"] is True
    rows = d["kernels"]
    assert {r["shape"] for r in rows} == {"digits"} and not any("error" in r for r in rows), rows
    assert {(r["op"], r["impl"]) for r in rows} >= {("dmd_loss fwd", "eager"), ("dmd_loss fwd", "triton"),
                                                     ("add_noise (Philox eps)", "triton")}
    assert all(r["ms"] > 0 and r["gb_s"] > 0 for r in rows)
    assert (tmp_path / "out/device.txt").read_text().strip()


def test_default_run_caps_each_phase(tmp_path):
    """The default (all) runs the three phases in order; a phase over its cap is cut off with a note and the
    script exits non-zero, while the phases within their caps keep their results."""
    r = _run(tmp_path, GPU_CAP_TESTS="120", GPU_CAP_LATENCY="120", GPU_CAP_KERNELS="120", GPU_CAP_STEPS="1")
    out = r.stdout
    assert r.returncode == 1, out[-2000:] + r.stderr[-2000:]
    order = [out.index(f"== gpu_session: {p} (cap") for p in ("tests", "latency", "kernels", "steps")]
    assert order == sorted(order)
    assert "deselected" in (tmp_path / "out/gpu_tests.log").read_text()  # pytest ran, CPU tests deselected
    assert json.loads((tmp_path / "out/throughput_kernels.json").read_text())["kernels"]
    lat = json.loads((tmp_path / "out/latency.json").read_text())["rows"]
    assert {(r["provider"], r["batch"]) for r in lat} == {(p, b) for p in ("eager", "stock") for b in (1, 2)}
    assert all(r["max_diff_vs_eager"] == 0 for r in lat)  # the stock call and the sampler draw the same digits
    assert "== gpu_session: steps cut off at its cap of 1s" in out
    assert "== gpu_session: kernels cut off" not in out


def test_bench_shape_choice_is_checked(tmp_path):
    r = subprocess.run([sys.executable, "bench/throughput.py", "--device", "cpu", "--shapes", "digits,imagenet32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--shapes: unknown shape 'imagenet32'" in r.stderr


def test_rows_reach_the_json_while_the_bench_runs(tmp_path):
    """Each row is written the moment it is measured: the JSON holds rows while the run is still going, and
    stays valid when the run is interrupted."""
    import signal
    import time
    js = tmp_path / "k.json"
    p = subprocess.Popen([sys.executable, "bench/throughput.py", *CPU_BENCH.split(), "--no-step", "--iters", "3",
                          "--json", str(js)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if js.exists() and json.loads(js.read_text() or "{}").get("kernels"):
                break
            time.sleep(0.05)
        assert p.poll() is None, "the bench finished before any row reached its JSON"
        p.send_signal(signal.SIGINT)
        p.wait(60)
    finally:
        p.kill()
    rows = json.loads(js.read_text())["kernels"]
    assert 1 <= len(rows) < 12, len(rows)  # a partial run: some rows, not all twelve
