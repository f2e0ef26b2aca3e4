"""bench/digits_table.py on a short budget: several training seeds of two DMD2 rows, two runs at a time, both
judges, and each row's mean and spread computed from its seeds' own scores."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def _table(out, *variants, seeds=("0", "1", "1")):
    return subprocess.run([sys.executable, "bench/digits_table.py", "--out", str(out), "--variants", *variants,
                           "--seeds", *seeds, "--sample-seeds", "4", "5", "--steps", "2", "--jobs", "2",
                           "--set", "eval.num_samples=40",
                           "--set", "train.fake_updates_per_generator=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_table_aggregates_seeds_of_each_row(tmp_path):
    out = tmp_path / "table"
    r = _table(out, "DMD2", "DMD2, 4 steps")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = {row["row"]: row for row in json.loads((out / "table.json").read_text())}
    assert list(rows) == ["real held-out digits (floor)", "teacher, heun 18 steps", "teacher, 1 step", "DMD2",
                          "DMD2, 4 steps"]
    assert rows["DMD2, 4 steps"]["nfe"] == 4 and rows["DMD2"]["nfe"] == 1
    for name in ("teacher, heun 18 steps", "DMD2", "DMD2, 4 steps"):
        row = rows[name]
        assert row["seeds"] == 2 and len(row["per_seed"]) == 2  # the repeated seed ran once
        for k in ("fd", "fd2"):
            v = [s[k] for s in row["per_seed"]]
            assert row[k] == pytest.approx(np.mean(v)) and row[k + "_std"] == pytest.approx(np.std(v, ddof=1))
            assert v[0] != v[1]  # two seeds (or two sample sets)
    # every model draws the same sample sets, and a run's score is its mean over them
    for name in ("DMD2_seed0", "DMD2_seed1"):
        sets = [json.loads((out / name / f"samples_seed{s}.metrics.json").read_text()) for s in (4, 5)]
        run = rows["DMD2"]["per_seed"][int(name[-1])]
        for k in ("fd", "fd2", "accuracy", "fd2_all_mean", "fd_spread", "pixel_spread"):
            assert run[k] == pytest.approx(np.mean([m[k] for m in sets])), k
    a, b = (np.load(out / "DMD2_seed0" / f"samples_seed{s}.npz")["images"] for s in (4, 5))
    assert len(a) == 40 and not np.array_equal(a, b)  # two seeds, two sets
    assert all((out / f"teacher_heun18_seed{s}.npz").is_file() for s in (4, 5))
    assert (out / "DMD2_4_steps_seed1" / "generator" / "dmd_model.json").is_file()
    assert "judge 2" in (out / "table.md").read_text() and "FD / teacher's 35-NFE FD" in r.stdout
    md = (out / "table.md").read_text().split("Where the gaps come from")[1]
    d = rows["DMD2"]
    assert f"| DMD2 | {d['fd_all']:.3f} = {d['fd_all_mean']:.3f} + {d['fd_all'] - d['fd_all_mean']:.3f} |" in md

    # started again with the same arguments, finished runs are scored again, not retrained
    made = {p: p.stat().st_mtime_ns for p in out.glob("DMD2_seed*/samples.npz")}
    again = _table(out, "DMD2", seeds=("0", "1"))
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert again.stdout.count("scored again, not retrained") == 2 and len(made) == 2
    assert all(p.stat().st_mtime_ns == t for p, t in made.items())
    row = {r["row"]: r for r in json.loads((out / "table.json").read_text())}["DMD2"]
    assert row["fd"] == rows["DMD2"]["fd"] and row["fd2"] == rows["DMD2"]["fd2"]
    # another length or another config is another run
    import importlib.util
    spec = importlib.util.spec_from_file_location("digits_table", ROOT / "bench" / "digits_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    run, cfg = out / "DMD2_seed0", json.loads((out / "DMD2_seed0" / "config.json").read_text())
    sets = [f"data.pairs_dir={cfg['data']['pairs_dir']}", f"train.threads={cfg['train']['threads']}",
            "eval.num_samples=40", "train.fake_updates_per_generator=1"]
    assert table.finished(run, "configs/digits_dmd2.json", sets + ["train.seed=0"], 2) is not None
    assert table.finished(run, "configs/digits_dmd2.json", sets + ["train.seed=0"], 3) is None
    assert table.finished(run, "configs/digits_dmd2.json", sets + ["train.seed=1"], 2) is None
    assert table.finished(run, "configs/digits_dmd2.json", sets + ["train.seed=0", "eval.num_samples=41"], 2) is None
    # a key the run's config.json lacks (added to the engine after the run) counts at its default
    written, stamp = run / "config.json", (run / "config.json").stat().st_mtime_ns
    older = json.loads(written.read_text())
    assert older["train"]["real_guidance"] == 1.0  # the default, which the digits config keeps
    del older["train"]["real_guidance"]
    written.write_text(json.dumps(older))
    os.utime(written, ns=(stamp, stamp))
    assert table.finished(run, "configs/digits_dmd2.json", sets + ["train.seed=0"], 2) is not None
    assert table.finished(run, "configs/digits_dmd2.json", sets + ["train.seed=0", "train.real_guidance=2"],
                          2) is None
    (run / "samples.npz").rename(run / "kept.npz")  # a partial folder
    assert table.finished(run, "configs/digits_dmd2.json", sets + ["train.seed=0"], 2) is None
    (run / "kept.npz").rename(run / "samples.npz")
    os.utime(run / "summary.json", ns=(0, 0))  # a summary older than its config.json: a later run did not finish
    assert table.finished(run, "configs/digits_dmd2.json", sets + ["train.seed=0"], 2) is None


def test_breakdown_averages_over_sets_and_seeds_and_skips_older_metrics():
    import importlib.util
    spec = importlib.util.spec_from_file_location("digits_table", ROOT / "bench" / "digits_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rng = np.random.default_rng(0)

    def scored():  # one sample set's metrics, as examples/digits/evaluate.py writes them
        m = {k: float(rng.uniform(1, 3)) for k in table.SCORES + table.BREAKDOWN}
        m.update(fd_std=0.1, fd2_std=0.1)
        return m
    seeds = [[scored() for _ in range(3)] for _ in range(2)]
    row = table.aggregate("DMD2", 1, [table.mean_of(s) for s in seeds])
    for k in table.BREAKDOWN:  # the mean over each seed's sets, then over the seeds
        assert row[k] == pytest.approx(np.mean([np.mean([m[k] for m in s]) for s in seeds])), k
    lines = table.breakdown([row])
    assert lines and lines[-1].startswith(f"| DMD2 | {row['fd_all']:.3f} = {row['fd_all_mean']:.3f} + ")
    # metrics written before the breakdown existed: the row has none of it, and the second table is left out
    old = [{k: v for k, v in m.items() if k not in table.BREAKDOWN} for m in seeds[0]]
    row = table.aggregate("DMD", 1, [table.mean_of(old)])
    assert not any(k in row for k in table.BREAKDOWN) and table.breakdown([row]) == []
    mixed = table.mean_of(old[:2] + seeds[1][:1])  # a key only some sets have is not averaged over those few
    assert not any(k in mixed for k in table.BREAKDOWN)
