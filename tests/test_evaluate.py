"""engine/evaluate.py on tiny random feature nets: a TorchScript stand-in for clean-fid's Inception file (so the
real clean-fid path runs) and a tiny CLIPModel folder. Numbers are checked against direct computations."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from engine import cli, evaluate, metrics

N, SIDE = 24, 16
WORDS = ["a red bicycle", "a bowl of soup", "two cats", "a green door", "snow on a hill", "an old clock"]


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 13, stride=13)  # 299 -> 23
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(128, 2048)

    def forward(self, x):
        return self.fc(self.pool(torch.tanh(self.conv(x))).flatten(1)).view(-1, 2048, 1, 1)


class _Inception(torch.nn.Module):
    """What clean-fid's InceptionV3W uses of the real file: .layers on (x - 128) / 128 at 299 px, 2048 features."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers((x - 128) / 128).view(x.shape[0], 2048)


def _images(seed, n=N, h=SIDE, w=SIDE, bright=0):
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255 - bright, (n, 4, 4, 3))
    up = np.kron(low, np.ones((1, (h + 3) // 4, (w + 3) // 4, 1)))[:, :h, :w]  # smooth: survives resizing
    return (up + bright + rng.uniform(-20, 20, up.shape)).clip(0, 255).astype(np.uint8)


def _pngs(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / (names[i] if names else f"{i:05d}.png"))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    torch.jit.script(_Inception().eval()).save(str(d / metrics.INCEPTION_NAME))
    a, b = _images(1), _images(2, bright=60)
    prompts = [WORDS[i % len(WORDS)] for i in range(N)]
    np.savez(d / "a.npz", images=a, labels=np.arange(N) % len(WORDS), prompts=np.array(prompts))
    np.savez(d / "b.npz", images=b, labels=np.arange(N) % len(WORDS))
    (d / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return dict(dir=d, a=a, b=b, prompts=prompts, inception=d / metrics.INCEPTION_NAME, clip=_tiny_clip(d / "clip"),
                ref_a=_pngs(d / "ref_a", a), ref_wide=_pngs(d / "ref_wide", _images(3, n=30, h=20, w=29)))


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from models.sd15 import _byte_symbols
    syms = _byte_symbols()
    vocab = {s: i for i, s in enumerate(syms + [s + "</w>" for s in syms] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: every word splits into characters
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    eot = vocab["<|endoftext|>"]
    torch.manual_seed(4)  # a seed whose cosines on the test images have both signs, so the clamp at 0 matters
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=eot - 1,
                                      eos_token_id=eot, pad_token_id=eot),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _run(capsys, env, *args, clip=True, inception=True):
    """evaluate.py in this process: (exit code, stdout, stderr, the --json results or None). clip/inception: True
    for the test nets, None to leave the option out, or a path."""
    out = env["dir"] / "res.json"
    out.unlink(missing_ok=True)
    clip, inception = env["clip"] if clip is True else clip, env["inception"] if inception is True else inception
    extra = ["--device", "cpu", "--workers", "0", "--batch-size", "7", "--json", str(out)]
    extra += (["--clip", str(clip)] if clip else []) + (["--inception", str(inception)] if inception else [])
    sys.argv = ["evaluate.py", *map(str, args), *extra]
    try:
        cli.main_guard(evaluate.main)
        code = 0
    except SystemExit as e:
        code = e.code
    o, e = capsys.readouterr()
    return code, o, e, json.loads(out.read_text()) if out.exists() else None


# -- direct computations, written independently of engine/metrics.py --------------------------------------------

def _direct_features(env, images, size):
    net = torch.jit.load(str(env["inception"]))
    feats = []
    for im in images:
        h, w = im.shape[:2]
        s = min(h, w)
        top, left = int(round((h - s) / 2)), int(round((w - s) / 2))
        sq = np.asarray(Image.fromarray(im[top:top + s, left:left + s]).resize((size, size), Image.LANCZOS))
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(sq[..., c], np.float32)).resize((299, 299),
                 Image.BICUBIC)).clip(0, 255) for c in range(3)]  # clean-fid "clean": float bicubic per channel
        with torch.no_grad():
            feats.append(net.layers((torch.from_numpy(np.stack(chans))[None] - 128) / 128).reshape(-1).numpy())
    return np.stack(feats).astype(np.float64)


def _direct_fid(f1, f2):
    """tr sqrt(S1 S2) = nuclear norm of A Bᵀ / sqrt((n1-1)(n2-1)), A and B the centred features."""
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(a), len(b)
    cross = np.linalg.norm(a @ b.T, "nuc") / np.sqrt((n1 - 1) * (n2 - 1))
    return ((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a ** 2).sum() / (n1 - 1) + (b ** 2).sum() / (n2 - 1) - 2 * cross


def _direct_clip(env, images, prompts):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    model = CLIPModel.from_pretrained(env["clip"]).eval()
    t = AutoTokenizer.from_pretrained(env["clip"])(prompts, padding=True, truncation=True, max_length=32,
                                                   return_tensors="pt")
    px = AutoImageProcessor.from_pretrained(env["clip"])(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        o = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=px)
    cos = (o.image_embeds * o.text_embeds).sum(-1)
    return float((100 * cos.clamp(min=0)).mean()), cos


def _direct_clip_features(env, images, size, clip=None):
    """Crop + Lanczos as for FID, the model's processor, then the unnormalised projected image embedding."""
    from transformers import AutoImageProcessor, CLIPModel
    folder = clip or env["clip"]
    model, proc = CLIPModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)
    squares = []
    for im in images:
        h, w = im.shape[:2]
        s = min(h, w)
        top, left = int(round((h - s) / 2)), int(round((w - s) / 2))
        squares.append(np.asarray(Image.fromarray(im[top:top + s, left:left + s]).resize((size, size), Image.LANCZOS)))
    with torch.no_grad():
        out = model.get_image_features(pixel_values=proc(images=squares, return_tensors="pt")["pixel_values"])
    return (out if torch.is_tensor(out) else out.pooler_output).numpy().astype(np.float64)


# -- tests ----------------------------------------------------------------------------------------------------

def test_fid_and_clip_match_direct_computations(env, capsys):
    code, out, err, r = _run(capsys, env, env["dir"] / "a.npz", "--ref", env["ref_wide"], "--ref-stats",
                             env["dir"] / "wide.npz")
    assert code == 0, err
    want = _direct_fid(_direct_features(env, env["a"], SIDE), _direct_features(env, _images(3, n=30, h=20, w=29), SIDE))
    assert r["fid"] == pytest.approx(want, rel=1e-5) and r["fid"] > 1
    want, cos = _direct_clip(env, env["a"], env["prompts"])
    assert r["clip_score"] == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert (cos > 0).any() and (cos < 0).any()
    assert r["num_samples"] == N and r["num_reference"] == 30 and r["fid_size"] == SIDE
    assert "FID" in out and "CLIP score" in out and "30 images" in out


def test_fid_of_a_set_against_itself_is_zero_and_against_another_is_not(env, capsys):
    code, _, err, same = _run(capsys, env, env["dir"] / "a.npz", "--ref", env["ref_a"], "--metrics", "fid",
                              clip=False)
    assert code == 0, err
    assert abs(same["fid"]) < 1e-6 * np.trace(np.cov(_direct_features(env, env["a"], SIDE), rowvar=False))
    _, _, _, other = _run(capsys, env, env["dir"] / "b.npz", "--ref", env["ref_a"], "--metrics", "fid", clip=False)
    assert other["fid"] > 1


def test_frechet_equals_clean_fids(env):
    from cleanfid.fid import frechet_distance
    rng = np.random.default_rng(0)
    for n in (20, 300):  # fewer and more samples than dimensions: both routes of frechet()
        f1, f2 = rng.standard_normal((n, 64)), rng.standard_normal((200, 64)) @ rng.standard_normal((64, 64)) + 0.3
        (m1, s1), (m2, s2) = metrics.statistics(f1), metrics.statistics(f2)
        assert metrics.frechet(m1, s1, m2, s2, f1) == pytest.approx(frechet_distance(m1, s1, m2, s2), rel=1e-6)
        assert metrics.frechet(m1, s1, m2, s2) == pytest.approx(_direct_fid(f1, f2), rel=1e-6)


def test_shuffled_prompts_score_differently(env, capsys):
    shuffled = env["dir"] / "shuffled.txt"
    shuffled.write_text("\n".join(env["prompts"][7:] + env["prompts"][:7]) + "\n")
    _, _, _, right = _run(capsys, env, env["dir"] / "a.npz", "--metrics", "clip")
    code, _, err, wrong = _run(capsys, env, env["dir"] / "a.npz", "--metrics", "clip", "--prompts", shuffled)
    assert code == 0, err
    assert wrong["clip_score"] != pytest.approx(right["clip_score"], rel=1e-3)
    # labels map a per-prompt file (what infer.py writes) onto the samples: b.npz has no prompts key
    # a blank line in it is skipped, as infer.py skipped it when it numbered the prompts
    (env["dir"] / "words.txt").write_text("\n".join(WORDS[:2]) + "\n\n  " + "\n".join(WORDS[2:]) + "\n")
    code, _, err, by_label = _run(capsys, env, env["dir"] / "b.npz", "--metrics", "clip", "--prompts",
                                  env["dir"] / "words.txt")
    assert code == 0, err
    assert by_label["clip_score"] == pytest.approx(_direct_clip(env, env["b"], env["prompts"])[0], rel=1e-5, abs=1e-4)


def test_png_folder_and_npz_give_the_same_numbers(env, capsys):
    names = [f"{i:05d}_{p.replace(' ', '-')}.png" for i, p in enumerate(env["prompts"])]
    folder = _pngs(env["dir"] / "pngs", env["a"], names)
    Image.fromarray(env["a"][0]).save(folder / "grid.png")  # infer.py's grid beside the samples: not a sample
    args = ("--ref", env["ref_wide"], "--ref-stats", env["dir"] / "wide.npz")
    _, _, _, from_npz = _run(capsys, env, env["dir"] / "a.npz", *args)
    code, _, err, from_pngs = _run(capsys, env, folder, *args, "--prompts", env["dir"] / "prompts.txt")
    assert code == 0, err
    assert from_pngs["fid"] == pytest.approx(from_npz["fid"], rel=1e-9)
    assert from_pngs["clip_score"] == pytest.approx(from_npz["clip_score"], rel=1e-9)
    (folder / "samples.npz").write_bytes((env["dir"] / "a.npz").read_bytes())  # preferred over the PNGs
    _, _, _, inside = _run(capsys, env, folder, *args)
    assert inside["fid"] == pytest.approx(from_npz["fid"], rel=1e-9)


def test_reference_stats_are_cached_and_invalidated(env, capsys, monkeypatch, tmp_path):
    calls = []
    real = metrics.folder_features
    monkeypatch.setattr(metrics, "folder_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, cache = _pngs(tmp_path / "ref", env["b"][:10]), tmp_path / "stats.npz"
    args = (env["dir"] / "a.npz", "--ref", ref, "--ref-stats", cache, "--metrics", "fid")
    _, out1, _, r1 = _run(capsys, env, *args, clip=False)
    stamp = cache.stat().st_mtime_ns
    _, out2, _, r2 = _run(capsys, env, *args, clip=False)
    assert len(calls) == 1 and "computed" in out1 and "reused" in out2 and cache.stat().st_mtime_ns == stamp
    assert r2["fid"] == r1["fid"]
    _pngs(tmp_path / "ref" / "more", env["b"][10:12])  # the folder changes: recomputed, cache replaced
    _, out3, _, r3 = _run(capsys, env, *args, clip=False)
    assert len(calls) == 2 and "computed" in out3 and r3["num_reference"] == 12 and r3["fid"] != r1["fid"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    # default location: next to --json, named by its key
    _run(capsys, env, env["dir"] / "a.npz", "--ref", ref, "--metrics", "fid", clip=False)
    assert len(list(env["dir"].glob("fid_ref_ref_16px_*.npz"))) == 1


def test_missing_inception_file_is_one_line_and_exit_2(env, tmp_path):
    missing = tmp_path / "nowhere" / metrics.INCEPTION_NAME
    r = subprocess.run([sys.executable, str(ROOT / "engine/evaluate.py"), str(env["dir"] / "a.npz"), "--ref",
                        str(env["ref_a"]), "--inception", str(missing), "--metrics", "fid"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(missing) in r.stderr, r.stderr


@pytest.mark.parametrize("case", ["prompt_count", "npz_prompt_count", "no_images_key", "empty_ref", "clip_no_prompts",
                                  "default_inception_missing", "clip_missing", "bad_metric", "fd_clip_no_ref"])
def test_bad_input_is_one_line_and_exit_2(env, capsys, monkeypatch, tmp_path, case):
    a, x = env["dir"] / "a.npz", tmp_path / "x.npz"
    if case == "npz_prompt_count":
        np.savez(x, images=env["a"], prompts=np.array(env["prompts"][:-1]))
    else:
        np.savez(x, samples=np.zeros((3, 2)))
    monkeypatch.setattr(metrics, "inception_dirs", lambda: [tmp_path])
    args, kw, expect = {
        "prompt_count": ((_pngs(tmp_path / "p", env["a"][:5]), "--prompts", env["dir"] / "prompts.txt"), {},
                         "5 images"),
        "npz_prompt_count": ((x, "--metrics", "clip"), {}, "23 prompts"),
        "no_images_key": ((x,), {}, "'images'"),
        "empty_ref": ((a, "--ref", tmp_path / "empty", "--metrics", "fid"), {}, "no images"),
        "clip_no_prompts": ((env["dir"] / "b.npz", "--metrics", "clip"), {}, "no prompts"),
        "default_inception_missing": ((a, "--ref", env["ref_a"]), {"inception": None}, metrics.INCEPTION_NAME),
        "clip_missing": ((a, "--metrics", "clip"), {"clip": tmp_path / "no_clip"}, "no_clip"),
        "bad_metric": ((a, "--metrics", "fid,kid"), {}, "--metrics"),
        "fd_clip_no_ref": ((a, "--metrics", "fd_clip"), {}, "cannot compute FD_CLIP: no reference folder"),
    }[case]
    if case == "empty_ref":
        (tmp_path / "empty").mkdir()
    code, _, err, _ = _run(capsys, env, *args, **kw)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (case, err)
    assert expect in err, (case, err)


def test_fd_clip_matches_a_direct_computation(env, capsys):
    wide = _images(3, n=30, h=20, w=29)
    code, out, err, r = _run(capsys, env, env["dir"] / "a.npz", "--ref", env["ref_wide"], "--ref-stats",
                             env["dir"] / "wide.npz")
    assert code == 0, err
    want = _direct_fid(_direct_clip_features(env, env["a"], SIDE), _direct_clip_features(env, wide, SIDE))
    assert r["fd_clip"] == pytest.approx(want, rel=1e-5) and want > 1e-3
    assert r["fid"] != pytest.approx(r["fd_clip"], rel=1e-2)  # its own feature space, not FID's copied
    assert "FD_CLIP" in out and (env["dir"] / "wide.fd_clip.npz").is_file()
    # a set against itself: zero; a brighter set against it: not
    code, _, err, same = _run(capsys, env, env["dir"] / "a.npz", "--ref", env["ref_a"], "--metrics", "fd_clip")
    assert code == 0, err
    assert "fid" not in same
    feats = _direct_clip_features(env, env["a"], SIDE)
    assert abs(same["fd_clip"]) < 1e-6 * np.trace(np.cov(feats, rowvar=False))
    _, _, _, other = _run(capsys, env, env["dir"] / "b.npz", "--ref", env["ref_a"], "--metrics", "fd_clip")
    want = _direct_fid(_direct_clip_features(env, env["b"], SIDE), feats)
    assert other["fd_clip"] == pytest.approx(want, rel=1e-5) and want > 1e-3


def test_fd_clip_reference_cache_is_keyed_by_the_clip_weights(env, capsys, tmp_path):
    import shutil
    from transformers import CLIPModel
    ref, cache = _pngs(tmp_path / "ref", env["b"][:10]), tmp_path / "stats.npz"
    args = (env["dir"] / "a.npz", "--ref", ref, "--ref-stats", cache, "--metrics", "fd_clip")
    _, out1, _, r1 = _run(capsys, env, *args)
    _, out2, _, r2 = _run(capsys, env, *args)
    assert "computed" in out1 and "reused" in out2 and r2["fd_clip"] == r1["fd_clip"]
    copy = shutil.copytree(env["clip"], tmp_path / "clip_copy")  # the same weights elsewhere: the same statistics
    _, out3, _, r3 = _run(capsys, env, *args, clip=copy)
    assert "reused" in out3 and r3["fd_clip"] == r1["fd_clip"]
    model = CLIPModel.from_pretrained(copy)
    with torch.no_grad():
        model.visual_projection.weight.mul_(1.5)  # other weights, same folder: recomputed
    model.save_pretrained(copy)
    _, out4, err, r4 = _run(capsys, env, *args, clip=copy)
    assert "computed" in out4 and r4["clip_fingerprint"] != r1["clip_fingerprint"], err
    want = _direct_fid(_direct_clip_features(env, env["a"], SIDE, copy), _direct_clip_features(env, env["b"][:10],
                                                                                              SIDE, copy))
    assert r4["fd_clip"] == pytest.approx(want, rel=1e-5)


def test_a_missing_piece_is_named_in_one_line(env, capsys):
    # no prompts and no --clip: FID alone, and FD_CLIP says what it lacks (no default model is tried)
    code, out, err, r = _run(capsys, env, env["dir"] / "b.npz", "--ref", env["ref_a"], clip=None)
    assert code == 0, err
    assert "fid" in r and "fd_clip" not in r and "clip_score" not in r
    assert [ln for ln in out.splitlines() if ln.startswith("FD_CLIP: skipped")] == [
        "FD_CLIP: skipped, no CLIP model (--clip PATH_OR_ID)"]
    # no reference: CLIP score alone, both Frechet distances say so
    code, out, err, r = _run(capsys, env, env["dir"] / "a.npz")
    assert code == 0, err
    assert "clip_score" in r and "fid" not in r and "fd_clip" not in r
    for name in ("FID", "FD_CLIP"):
        assert f"{name}: skipped, no reference folder (--ref FOLDER)" in out.splitlines()
