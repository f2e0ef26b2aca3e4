"""Pairs to the step (engine/pair_loader.py): the DALI feed hands out exactly the numpy feed's batches, per
rank, across epochs, and resumes where a checkpoint says, however far it has read ahead."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_denoiser
from test_config_cli import run
from test_end_to_end import _cfg


@pytest.fixture(scope="module")
def needs_dali():
    """Only the DALI tests need NVIDIA DALI; the sampler and one-line-error tests run without it."""
    return pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from engine.config import DataSection
    from engine.pairs import PairReader, write_pairs
    folder = tmp_path_factory.mktemp("pairs") / "p"
    write_pairs(folder, tiny_denoiser(), "h", DataSection(num_pairs=22, pair_steps=1, shard_size=8), progress=False)
    return PairReader(folder)


def test_batch_k_is_a_pure_function_of_k():
    from engine.pairs import BatchSampler, PairsError
    s, ref = BatchSampler(22, 4, 3), BatchSampler(22, 4, 3)
    seen = []
    for k in range(17):  # 5 batches an epoch (2 pairs dropped): crosses three epoch boundaries
        assert s.consumed == k
        seen.append(ref.at(k))
        assert np.array_equal(s.next(), seen[-1])
    assert len({tuple(sorted(b)) for b in seen[:5]}) == 5 and not np.array_equal(seen[0], seen[5])
    with pytest.raises(PairsError, match="reg_batch_size = 30 is larger than the 22 pairs"):
        BatchSampler(22, 30, 0)


class _Rank:
    def __init__(self, rank, world):
        self.rank, self.world_size, self.device = rank, world, torch.device("cpu")

    def local(self, x):
        n = x.shape[0] // self.world_size
        return x[self.rank * n: (self.rank + 1) * n]


@pytest.mark.parametrize("rank, world", [(0, 1), (0, 2), (1, 2)])
def test_dali_feed_equals_numpy_feed_and_resumes(needs_dali, pairs, rank, world):
    from engine.pair_loader import DaliFeed, NumpyFeed
    from engine.pairs import BatchSampler
    m = _Rank(rank, world)
    ref = NumpyFeed(pairs, BatchSampler(len(pairs), 4, 7), m.local, "cpu")
    want = [ref.next() for _ in range(12)]
    s = BatchSampler(len(pairs), 4, 7)
    dali = DaliFeed(pairs, s, rank, world, "cpu", depth=3)
    for k in range(7):
        got = dali.next()
        for a, b in zip(got, want[k]):
            assert a.dtype == b.dtype and torch.equal(a, b), k
    assert s.consumed == 7  # not the batches DALI has already read ahead
    state = s.state_dict()
    dali.close()
    s2 = BatchSampler(len(pairs), 4, 7)
    s2.load_state_dict(state)
    resumed = DaliFeed(pairs, s2, rank, world, "cpu")
    for k in range(7, 12):
        assert all(torch.equal(a, b) for a, b in zip(resumed.next(), want[k])), k
    resumed.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_both_feeds_turn_16_bit_pairs_into_the_rounded_float32_values(needs_dali, pairs, tmp_path, dtype):
    """data.pair_dtype: DALI gets the stored 16 bits and converts in its pipeline; numpy converts on read."""
    from engine.config import DataSection
    from engine.pair_loader import DaliFeed, NumpyFeed
    from engine.pairs import BatchSampler, PairReader, write_pairs
    folder = tmp_path / dtype
    write_pairs(folder, tiny_denoiser(), "h", DataSection(num_pairs=22, pair_steps=1, shard_size=8, pair_dtype=dtype),
                progress=False)
    r16 = PairReader(folder)
    full = NumpyFeed(pairs, BatchSampler(22, 4, 7), lambda x: x, "cpu")  # the float32 pairs of the same job
    numpy = NumpyFeed(r16, BatchSampler(22, 4, 7), lambda x: x, "cpu")
    dali = DaliFeed(r16, BatchSampler(22, 4, 7), 0, 1, "cpu")
    order = BatchSampler(22, 4, 7)

    def stored(part):  # the raw 16-bit files, widened here independently of the feeds
        a = np.concatenate([np.load(f) for f in sorted(folder.glob(f"shard_*.{part}.npy"))])
        return torch.from_numpy((a.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else
                                a.astype(np.float32))
    raw_z, raw_y = stored("z"), stored("y")
    for k in range(6):
        idx = torch.as_tensor(order.next())
        z32 = full.next()[0]
        assert torch.equal(raw_z[idx], z32.to(getattr(torch, dtype)).float())  # z: the job's noise, rounded
        for feed in (numpy, dali):
            z, y, _ = feed.next()
            assert z.dtype == y.dtype == torch.float32 and torch.equal(z, raw_z[idx]) and torch.equal(y, raw_y[idx]), k
    dali.close()


def test_training_with_dali_matches_numpy_and_resumes(needs_dali, tmp_path, tiny_teacher_dir):
    cfg = _cfg(tmp_path, tiny_teacher_dir, sample_every=0, save_every=2)
    keys = ("loss_dm", "loss_reg", "loss_fake", "loss_g")
    logs = {}
    for loader in ("numpy", "dali"):
        out = tmp_path / loader
        r = run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet", "--set", f"data.loader={loader}",
                "--set", f"data.pairs_dir={tmp_path / 'pairs'}", "--max-steps", "2" if loader == "dali" else "4")
        assert r.returncode == 0, r.stderr[-2000:]
        if loader == "dali":  # stop after 2 steps, then resume to 4
            r = run("engine/train.py", "--config", str(cfg), "--out", str(out), "--quiet", "--resume", "--max-steps",
                    "4", "--set", "data.loader=dali", "--set", f"data.pairs_dir={tmp_path / 'pairs'}")
            assert r.returncode == 0, r.stderr[-2000:]
        logs[loader] = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs["dali"]] == [1, 2, 3, 4]
    for a, b in zip(logs["numpy"], logs["dali"], strict=True):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)


def test_bad_loader_is_one_line(tmp_path, tiny_teacher_dir):
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_teacher_dir)), "--out", str(tmp_path / "r"),
            "--set", "data.loader=tfdata")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "data.loader must be one of auto, numpy, dali, got 'tfdata'" in r.stderr


def test_regression_batch_larger_than_the_pairs_is_one_line_before_any_work(tmp_path):
    """It used to train silently on all pairs, a smaller batch than asked for."""
    r = run("engine/train.py", "--config", "configs/toy2d.json", "--out", str(tmp_path / "r"),
            "--set", "data.num_pairs=100")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "train.reg_batch_size = 256 is larger than data.num_pairs = 100" in r.stderr
    assert not (tmp_path / "r" / "pairs").exists()
