import json

import numpy as np
import pytest
import torch

from engine.config import DataSection
from engine.pairs import BatchSampler, PairReader, PairsError, expected_manifest, noise_for, write_pairs
from models.toy import GaussianMixtureDenoiser


@pytest.fixture
def pairs(tmp_path):
    dc = DataSection(num_pairs=50, shard_size=20, pair_steps=6, pair_batch_size=16, pair_seed=7)
    teacher = GaussianMixtureDenoiser()
    write_pairs(tmp_path / "p", teacher, "abc123", dc, progress=False)
    return tmp_path / "p", dc, teacher


def test_round_trip(pairs):
    folder, dc, teacher = pairs
    r = PairReader(folder, expected_manifest("abc123", dc, (2,), None))
    assert len(r) == 50 and len(r.manifest["shards"]) == 3
    z, y, lab = r.batch([0, 21, 49])
    torch.testing.assert_close(z, noise_for([0, 21, 49], (2,), 7))   # noise is re-derivable from the seed
    from models.samplers import sample
    torch.testing.assert_close(y, sample(teacher, z, None, dc.pair_sampler, dc.pair_steps), rtol=1e-5, atol=1e-5)
    man = json.loads((folder / "manifest.json").read_text())
    for key in ("teacher_hash", "sampler", "steps", "guidance", "shape", "dtype", "count", "seed"):
        assert key in man


def test_truncated_shard_names_the_file(pairs):
    folder, _, _ = pairs
    f = folder / "shard_00001.y.npy"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(PairsError, match="shard_00001.y.npy"):
        PairReader(folder)


def test_missing_shard_names_the_file(pairs):
    folder, _, _ = pairs
    (folder / "shard_00002.z.npy").unlink()
    with pytest.raises(PairsError, match=r"shard_00002.z.npy' is missing"):
        PairReader(folder)


def test_wrong_shape_shard_names_the_file(pairs):
    folder, _, _ = pairs
    man = json.loads((folder / "manifest.json").read_text())
    np.save(folder / "shard_00000.label.npy", np.zeros(20, np.int32))  # same size class, wrong dtype
    man["shards"][0]["label_bytes"] = (folder / "shard_00000.label.npy").stat().st_size
    del man["shards"][0]["label_sha256"]  # as a manifest written before checksums: the shape check still holds
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PairsError, match="shard_00000.label.npy' holds int32"):
        PairReader(folder)


def test_mismatched_teacher_is_refused(pairs):
    folder, dc, _ = pairs
    with pytest.raises(PairsError, match="teacher_hash"):
        PairReader(folder, expected_manifest("other", dc, (2,), None))


def test_folder_without_manifest_is_incomplete(tmp_path):
    with pytest.raises(PairsError, match="no manifest.json"):
        PairReader(tmp_path)


def test_batch_sampler_resumes_in_order():
    a = BatchSampler(10, 4, seed=3)
    seq = [a.next().tolist() for _ in range(5)]
    b = BatchSampler(10, 4, seed=3)
    b.next(), b.next()
    c = BatchSampler(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next().tolist() for _ in range(3)] == seq[2:]
