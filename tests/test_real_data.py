"""Real data (engine/real_data.py, engine/encode_real.py, examples/digits/make_real.py): the folder format and its
checks; the encode job writes the autoencoder's own latents, and the same bytes when killed and continued or
made by 2 processes; Pillow and DALI decoding agree; the numpy and DALI feeds hand out the same batches."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_pair_loader import _Rank
from engine.pairs import BatchSampler
from engine.real_data import RealDataError, RealReader, autoencoder_hash, expected, make_real_feed, write_pixel_folder

SIZES = [(16, 16), (24, 20), (20, 31), (40, 40), (16, 16), (33, 38), (64, 48)]  # (h, w); shards of 3: 3 + 3 + 1
LATENT = (4, 8, 8)  # the tiny autoencoder halves 16x16 images


def _image(h: int, w: int, i: int) -> np.ndarray:
    """Smooth colours (a resize of noise would measure the resize filters, not the pipeline)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a = np.stack([np.sin(3 * x + i), np.cos(4 * y - i), x * y], -1)
    return ((a - a.min()) / np.ptp(a) * 255).astype(np.uint8)


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny Stable Diffusion folder, 7 captioned PNGs (captions.jsonl and .txt files, one subfolder), a config."""
    from PIL import Image

    from models.sd15 import make_sd_folder
    tmp = tmp_path_factory.mktemp("real")
    make_sd_folder(tmp / "sd", "tiny")
    images = tmp / "images"
    (images / "sub").mkdir(parents=True)
    listed = []
    for i, (h, w) in enumerate(SIZES):
        rel = f"sub/im{i}.png" if i % 3 == 2 else f"im{i}.png"
        Image.fromarray(_image(h, w, i)).save(images / rel)
        if i % 2:
            (images / rel).with_suffix(".txt").write_text(f"caption {i}\n")
        else:
            listed.append(json.dumps({"file": rel, "caption": f"caption {i}"}))
    (images / "captions.jsonl").write_text("\n".join(listed))
    cfg = tmp / "cfg.json"
    cfg.write_text(json.dumps({"name": "real", "model": {"kind": "sd15", "teacher": str(tmp / "sd")},
                               "data": {"dataset": "prompts", "prompts": "assets/prompts/demo.txt", "resolution": 16},
                               "train": {"threads": 1}}))
    return tmp, cfg, images


def _encode(cfg, images, out, *extra, env=None):
    return subprocess.run([sys.executable, "engine/encode_real.py", "--config", str(cfg), "--images", str(images),
                           "--out", str(out), "--shard-size", "3", "--batch-size", "2", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def reference(sd):
    """The folder one uninterrupted process makes with Pillow."""
    tmp, cfg, images = sd
    r = _encode(cfg, images, tmp / "ref", "--loader", "pil")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "ref", _files(tmp / "ref")


def _expect(sd):
    return expected("latents", LATENT, autoencoder_hash(sd[0] / "sd" / "vae"), 0.18215)


# --- the format ------------------------------------------------------------------------------------------------
def test_pixel_folder_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(23, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, 10, (23,), generator=g)
    r = RealReader(write_pixel_folder(tmp_path / "r", x, y, {"dataset": "test"}, shard_size=10),
                   expected("pixels", (1, 4, 4)))
    assert len(r) == 23 and len(r.manifest["shards"]) == 3 and r.manifest["source"] == {"dataset": "test"}
    idx = [22, 0, 15, 9, 10]  # across the three shards, out of order
    xb, yb = r.batch(idx)
    assert xb.dtype == torch.float32 and torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
    s = BatchSampler(len(r), 5, seed=1)
    assert torch.equal(r.batch(s.at(6))[0], x[s.at(6)])  # what the sampler names, in its order
    b16 = RealReader(write_pixel_folder(tmp_path / "b", x, y, {"dataset": "test"}, dtype="bfloat16", shard_size=10))
    assert torch.equal(b16.batch(idx)[0], x[idx].to(torch.bfloat16).float())  # stored in 16 bits, read as float32


KILLED_WRITE = """import sys, torch
sys.path.insert(0, {root!r})
from engine.real_data import write_pixel_folder
write_pixel_folder({out!r}, torch.zeros(30, 1, 2, 2), torch.zeros(30, dtype=torch.long), {{"dataset": "zeros"}},
                   shard_size=10)
"""


def test_a_pixel_folder_is_replaced_whole_or_not_at_all(tmp_path):
    x, y = torch.ones(12, 1, 2, 2), torch.arange(12)
    folder = write_pixel_folder(tmp_path / "r", x, y, {"dataset": "first"}, shard_size=5)
    before = _files(folder)
    script = KILLED_WRITE.format(root=str(ROOT), out=str(folder))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DMD_TEST_KILL_IN_SHARD": "2"})  # killed in the new folder's 2nd shard
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _files(folder) == before and RealReader(folder).manifest["source"] == {"dataset": "first"}
    write_pixel_folder(folder, -x, y, {"dataset": "second"}, shard_size=5)
    assert torch.equal(RealReader(folder).batch(range(12))[0], -x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # the killed writer's half folder is gone too
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RealDataError, match="holds something other than a real-data folder; not replaced"):
        write_pixel_folder(other, x, y, {"dataset": "first"})
    assert _files(other) == {"notes.txt": b"mine"}


def test_a_flipped_byte_and_a_foreign_autoencoder_are_refused_in_one_line(sd, reference, tmp_path):
    folder = tmp_path / "r"
    shutil.copytree(reference[0], folder)
    assert len(RealReader(folder, _expect(sd))) == len(SIZES)
    with pytest.raises(RealDataError) as e:
        RealReader(folder, expected("latents", LATENT, "0" * 64))
    msg = str(e.value)
    assert "\n" not in msg and "'autoencoder_hash' is '" in msg and f"but this run expects '{'0' * 64}'" in msg, msg
    with pytest.raises(RealDataError, match="'kind' is 'latents' but this run expects 'pixels'"):
        RealReader(folder, expected("pixels", LATENT))
    for name in ("shard_00001.x.npy", "shard_00002.captions.json"):
        f = folder / name
        good = f.read_bytes()
        f.write_bytes(good[:-3] + bytes([good[-3] ^ 0x10]) + good[-2:])  # one flipped bit, same size
        with pytest.raises(RealDataError) as e:
            RealReader(folder)
        assert "\n" not in str(e.value) and f"{name}' does not match the manifest's checksum" in str(e.value), e.value
        f.write_bytes(good)


# --- the encode job ---------------------------------------------------------------------------------------------
def _pixels(path, res: int = 16) -> torch.Tensor:
    """The module doc's rule written out again: centre square (halves rounded up), bilinear resize, [-1, 1]."""
    from PIL import Image
    a = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = a.shape
    s = min(h, w)
    top, left = (h - s + 1) // 2, (w - s + 1) // 2
    im = Image.fromarray(a[top:top + s, left:left + s])
    im = im if s == res else im.resize((res, res), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1)


def test_the_job_writes_the_autoencoders_latents_with_their_captions(sd, reference):
    from diffusers import AutoencoderKL
    tmp, _, images = sd
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    vae = AutoencoderKL.from_pretrained(tmp / "sd" / "vae")
    with torch.no_grad():
        want = vae.encode(torch.stack([_pixels(images / f) for f in files])).latent_dist.mean * 0.18215
    r = RealReader(reference[0], _expect(sd))
    got, captions = r.batch(np.arange(len(r)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert captions == [f"caption {f.split('im')[1][0]}" for f in files]
    assert r.label.tolist() == list(range(len(files)))  # a captioned row's label is its caption's index
    man = r.manifest
    assert (man["count"], man["resolution"], man["latent"], man["source"]["files"]) == (7, 16, "posterior mean", 7)
    assert [(s["start"], s["count"], s["decoder"]) for s in man["shards"]] == [(0, 3, "pil"), (3, 3, "pil"),
                                                                                (6, 1, "pil")]


def test_dali_cpu_and_pillow_decoding_agree(sd, reference, tmp_path):
    pytest.importorskip("nvidia.dali")
    _, cfg, images = sd
    r = _encode(cfg, images, tmp_path / "dali", "--loader", "dali")
    assert r.returncode == 0, r.stderr[-2000:]
    dali, pil = RealReader(tmp_path / "dali", _expect(sd)), RealReader(reference[0], _expect(sd))
    assert {s["decoder"] for s in dali.manifest["shards"]} == {"dali-cpu"}
    def strip(m):
        return {k: v for k, v in m.items() if k != "shards"}
    assert strip(dali.manifest) == strip(pil.manifest)  # the same job: only the shards' bytes differ
    (xd, cd), (xp, cp) = dali.batch(range(7)), pil.batch(range(7))
    assert cd == cp
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    for i, f in enumerate(files):
        ratio = ((xd[i] - xp[i]).abs().mean() / xp[i].abs().mean()).item()
        same_size = SIZES[int(f.split("im")[1][0])] == (16, 16)
        assert ratio < (1e-5 if same_size else 0.03), (f, ratio)  # 16x16: nothing to crop or resize


def test_a_killed_job_is_continued_to_the_same_bytes_and_a_complete_folder_is_kept(sd, reference, tmp_path):
    _, cfg, images = sd
    out = tmp_path / "real"
    r = _encode(cfg, images, out, "--loader", "pil", env={"DMD_TEST_KILL_IN_SHARD": "2"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / "shard_00000.json").is_file() and (out / "shard_00001.x.npy").is_file()
    assert not (out / "shard_00001.json").exists() and not (out / "manifest.json").exists()
    r = _encode(cfg, images, out, "--loader", "pil")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 of 3 shards complete, 2 to make on 1 process(es)" in r.stdout, r.stdout
    assert "shard 1 is made again: killed before it was complete" in r.stdout, r.stdout
    assert _files(out) == reference[1]  # every shard, record and the manifest, byte for byte
    r = _encode(cfg, images, out, "--loader", "pil", "--dtype", "float16")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "holds real data made from other images or settings (dtype differ); it is kept" in r.stderr
    assert _files(out) == reference[1]


def test_two_processes_make_the_same_bytes_as_one(sd, reference, tmp_path):
    pytest.importorskip("deepspeed")
    from test_zero3 import launch_script
    _, cfg, images = sd
    r = launch_script("engine/encode_real.py", "--config", cfg, "--images", images, "--out", tmp_path / "real",
                      "--shard-size", "3", "--batch-size", "2", "--loader", "pil", timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "rank 0 made 2 shard(s): 0, 2" in r.stdout and "rank 1 made 1 shard(s): 1" in r.stdout, r.stdout
    assert _files(tmp_path / "real") == reference[1]


def test_bad_input_is_one_line_before_any_work(sd, tmp_path):
    _, cfg, images = sd
    bare = tmp_path / "images"
    shutil.copytree(images, bare)
    (bare / "im1.txt").unlink()
    r = _encode(cfg, bare, tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"image '{bare / 'im1.png'}' has no caption" in r.stderr and not (tmp_path / "out").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = _encode(cfg, images, busy)
    assert r.returncode == 2 and "holds files a real-data folder does not (notes.txt)" in r.stderr, r.stderr
    assert _files(busy) == {"notes.txt": b"mine"}


# --- the feeds and the shipped digits ---------------------------------------------------------------------------
def test_numpy_and_dali_feeds_hand_out_the_same_batches(reference, tmp_path):
    pytest.importorskip("nvidia.dali")
    x, y = torch.rand(22, 1, 4, 4) * 2 - 1, torch.arange(22) % 10
    pixels = write_pixel_folder(tmp_path / "px", x, y, {"dataset": "test"}, dtype="bfloat16", shard_size=8)
    for folder, rank, world in ((reference[0], 1, 2), (pixels, 0, 1)):
        reader, m = RealReader(folder), _Rank(rank, world)
        order, s = BatchSampler(len(reader), 4, 5), BatchSampler(len(reader), 4, 5)
        numpy = make_real_feed("numpy", reader, BatchSampler(len(reader), 4, 5), m)
        dali = make_real_feed("dali", reader, s, m)
        for k in range(7):  # across epochs (7 rows: one batch of 4 an epoch; 22 rows: five)
            (xn, cn), (xd, cd) = numpy.next(), dali.next()
            idx = m.local(torch.as_tensor(order.at(k)))
            want_x, want_c = reader.batch(idx)
            assert xd.dtype == torch.float32 and torch.equal(xn, want_x) and torch.equal(xd, want_x), (folder, k)
            if reader.captions is None:
                assert cd.dtype == torch.int64 and torch.equal(cn, want_c) and torch.equal(cd, want_c)
            else:
                assert cn == cd == want_c and all(isinstance(c, str) for c in cd)
        assert s.consumed == 7
        dali.close()


def test_the_shipped_digits_real_data_is_the_training_split():
    from examples.digits.data import load_digits
    x, y = load_digits("train")
    r = RealReader(ROOT / "assets" / "digits_real", expected("pixels", (1, 8, 8)))
    xr, yr = r.batch(np.arange(len(r)))
    assert len(r) == len(x) and torch.equal(xr, x) and torch.equal(yr, y)
    assert r.manifest["source"]["split"] == "train"
