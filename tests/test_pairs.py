import json
import os

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


# --- a job continued after a crash: intact shards kept, the rest made again ------------------------------------
def _job(folder, **data):
    dc = DataSection(num_pairs=50, shard_size=10, pair_steps=4, pair_batch_size=4, pair_seed=3, **data)
    return write_pairs(folder, GaussianMixtureDenoiser(), "abc123", dc, progress=False), dc


def test_rerun_keeps_intact_shards_and_remakes_damaged_foreign_and_unfinished_ones(tmp_path, capsys):
    import shutil
    ref, _ = _job(tmp_path / "ref")
    want = {p.name: p.read_bytes() for p in ref.iterdir()}
    other, _ = _job(tmp_path / "other", pair_sampler="ddim")  # another config's shards
    folder = tmp_path / "p"
    shutil.copytree(ref, folder)
    (folder / "manifest.json").unlink()  # a job that did not finish
    z1 = folder / "shard_00001.z.npy"
    raw = bytearray(z1.read_bytes())
    raw[-3] ^= 1  # one flipped bit, same size
    z1.write_bytes(bytes(raw))
    for name in ("shard_00002.z.npy", "shard_00002.y.npy", "shard_00002.label.npy", "shard_00002.json"):
        shutil.copy(other / name, folder / name)
    (folder / "shard_00003.json").unlink()  # killed after its parts, before its record
    for p in folder.glob("shard_00004.*"):
        p.unlink()  # never started
    (folder / ".shard_00004.z.npy.tmp123").write_bytes(b"partial")  # killed while writing a part
    inodes = {p.name: p.stat().st_ino for p in folder.iterdir()}
    capsys.readouterr()
    _job(folder)
    out = capsys.readouterr().out
    assert "1 of 5 shards complete, 4 to make on 1 process(es)" in out, out
    assert "shard 1 is made again: shard_00001.z.npy does not match the record's checksum" in out, out
    assert "shard 2 is made again: made for another teacher or config" in out, out
    assert "shard 3 is made again: killed before it was complete" in out, out
    assert "rank 0 made 4 shard(s): 1, 2, 3, 4" in out, out
    got = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert got.keys() == want.keys() and [n for n in got if got[n] != want[n]] == []  # no stray file, same bytes
    kept = {n for n in got if n.startswith("shard_00000.")}
    assert len(kept) == 4 and all(p.stat().st_ino == inodes[p.name] for p in folder.iterdir() if p.name in kept)
    assert all(p.stat().st_ino != inodes.get(p.name) for p in folder.glob("shard_0000[1-4].*"))


# --- data.pair_dtype: 16-bit storage, float32 to the step ------------------------------------------------------
@pytest.mark.parametrize("dtype, stored", [("float16", np.float16), ("bfloat16", np.uint16)])
def test_pairs_stored_in_16_bits_read_back_as_float32_rounded_values(tmp_path, dtype, stored):
    ref, dc32 = _job(tmp_path / "f32")
    folder, dc = _job(tmp_path / dtype, pair_dtype=dtype)
    man = json.loads((folder / "manifest.json").read_text())
    assert man["dtype"] == dtype
    r32, r16 = PairReader(ref), PairReader(folder, expected_manifest("abc123", dc, (2,), None))
    with pytest.raises(PairsError, match="'dtype' is"):  # other pairs for a float32 run
        PairReader(folder, expected_manifest("abc123", dc32, (2,), None))
    for part in ("z", "y"):
        a16, a32 = np.load(folder / f"shard_00000.{part}.npy"), np.load(ref / f"shard_00000.{part}.npy")
        assert a16.dtype == stored and a16.nbytes * 2 == a32.nbytes
        size16, size32 = ((f / f"shard_00000.{part}.npy").stat().st_size for f in (folder, ref))
        assert size32 - size16 == a32.nbytes // 2  # the same .npy header, half the data
    idx = [0, 17, 49]
    (z16, y16, l16), (z32, y32, l32) = r16.batch(idx), r32.batch(idx)
    assert z16.dtype == y16.dtype == torch.float32
    assert torch.equal(z16, z32.to(getattr(torch, dtype)).float())  # round to nearest even, as torch does
    assert not torch.equal(z16, z32)  # the values really were rounded
    # y is the teacher's ODE from the stored (rounded) z, then rounded itself: the pair is consistent
    from models.samplers import sample
    y_from_stored = sample(GaussianMixtureDenoiser(), z16, None, dc.pair_sampler, dc.pair_steps, dc.pair_guidance)
    assert torch.equal(y16, y_from_stored.to(getattr(torch, dtype)).float())
    assert torch.allclose(y16, y32, rtol=2 ** -6, atol=1e-3) and not torch.equal(y16, y32)
    assert torch.equal(l16, l32)


def test_bfloat16_rounds_to_nearest_even_not_truncates():
    from engine.pairs import decode
    from engine.pairs_job import encode
    one_ulp = 2.0 ** -7  # bfloat16 keeps 7 bits after the point at 1.0
    x = torch.tensor([1 + 0.75 * one_ulp, 1 + 1.5 * one_ulp, 1 + 0.5 * one_ulp, -3.0e-3], dtype=torch.float32)
    got = torch.from_numpy(decode(encode(x, "bfloat16"), "bfloat16"))
    assert got.tolist()[:3] == [1 + one_ulp, 1 + 2 * one_ulp, 1.0]  # up, tie to even (up), tie to even (down)
    assert torch.equal(got, x.to(torch.bfloat16).float())


def test_a_second_job_on_the_same_folder_is_refused_and_a_dead_jobs_lock_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys
    folder = tmp_path / "p"
    folder.mkdir()
    lock = folder / ".pairs.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # a live job: this very process
    with pytest.raises(PairsError, match=r"another pairs job \(.*, pid \d+\) is writing .*; wait for it"):
        _job(folder)
    assert lock.read_text().endswith(str(os.getpid()))  # not ours to remove
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()} {dead.stdout.strip()}")  # a job that died on this machine
    _job(folder)
    assert (folder / "manifest.json").is_file() and not lock.exists()
