"""bench/digits_table.py on a short budget: several training seeds of two DMD2 rows, two runs at a time, both
judges, and each row's mean and spread computed from its seeds' own scores."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def test_table_aggregates_seeds_of_each_row(tmp_path):
    out = tmp_path / "table"
    r = subprocess.run([sys.executable, "bench/digits_table.py", "--out", str(out), "--variants", "DMD2",
                        "DMD2, 4 steps", "--seeds", "0", "1", "1", "--steps", "2", "--jobs", "2", "--set",
                        "eval.num_samples=40", "--set", "train.fake_updates_per_generator=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
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
            assert v[0] != v[1]  # two seeds, two sample sets
    assert (out / "DMD2_4_steps_seed1" / "generator" / "dmd_model.json").is_file()
    assert "judge 2" in (out / "table.md").read_text() and "FD / teacher's 35-NFE FD" in r.stdout
