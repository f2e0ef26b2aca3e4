"""The second digits judge (examples/digits/judge.py): the shipped asset, deterministic training, that its Frechet
distance tells real digits from damaged ones, and that examples/digits/evaluate.py reports it as computed here."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from engine.sampling import to_uint8
from examples.digits.data import load_digits
from examples.digits.judge import FEATURE_DIM, config_of, load_judge
from examples.digits.train_judge import train

ASSET = ROOT / "assets" / "digits_judge"


@pytest.fixture(scope="module")
def judge():
    return load_judge(ASSET)


def _fd(f1, f2):
    """Frechet distance of two feature sets, unbiased covariances; tr sqrt(S1 S2) as the nuclear norm of
    A Bᵀ / sqrt((n1-1)(n2-1)), A and B the centred features (written apart from clean-fid and engine/metrics.py)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(a), len(b)
    cross = np.linalg.norm(a @ b.T, "nuc") / np.sqrt((n1 - 1) * (n2 - 1))
    return ((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a ** 2).sum() / (n1 - 1) + (b ** 2).sum() / (n2 - 1) - 2 * cross


def _feats(model, x):
    with torch.no_grad():
        return model.features(x).numpy()


def test_shipped_judge_loads_and_reproduces_its_config(judge):
    cfg = json.loads((ASSET / "config.json").read_text())
    assert config_of(judge) == {k: cfg[k] for k in ("resolution", "width", "feature_dim")}
    assert cfg["feature_dim"] == FEATURE_DIM and cfg["seed"] != 0  # not the classifier's seed
    assert (ASSET / "model.safetensors").stat().st_size < 1 << 20
    x, _ = load_digits("train")
    assert _feats(judge, x[:5]).shape == (5, FEATURE_DIM)
    with torch.no_grad():  # the recorded training loss is this model's: the weights are the ones trained
        assert F.mse_loss(judge(x), x).item() == pytest.approx(cfg["train_mse"], abs=2e-6)


def test_training_is_deterministic_for_a_seed():
    a, meta = train(epochs=2, seed=7)
    torch.manual_seed(123)  # what ran before must not matter
    torch.rand(5)
    b, _ = train(epochs=2, seed=7)
    c, _ = train(epochs=2, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert meta["seed"] == 7 and meta["epochs"] == 2


def test_real_digits_score_far_below_damaged_ones(judge):
    xt, _ = load_digits("train")
    xh, _ = load_digits("heldout")
    with torch.no_grad():  # the code keeps the digit: unseen digits come back from it (a random net's do not)
        assert F.mse_loss(judge(xh), xh) < 0.1 * F.mse_loss(xt.mean(0, keepdim=True).expand_as(xh), xh)
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([im.flatten()[torch.randperm(im.numel(), generator=g)].view_as(im) for im in xh])
    blurred = F.avg_pool2d(F.pad(xh, (1, 1, 1, 1), mode="replicate"), 3, 1)
    ref = _feats(judge, xt)
    floor = _fd(_feats(judge, xh), ref)
    assert 0 < floor < 5
    assert _fd(_feats(judge, shuffled), ref) > 20 * floor
    assert _fd(_feats(judge, blurred), ref) > 10 * floor


def test_evaluate_reports_fd2_as_a_direct_computation(judge, tmp_path):
    from examples.digits.classifier import load_classifier
    xh, yh = load_digits("heldout")
    xt, _ = load_digits("train")
    blurred = F.avg_pool2d(F.pad(xh[:60], (1, 1, 1, 1), mode="replicate"), 3, 1)
    images, labels = to_uint8(torch.cat([xh, blurred])), np.concatenate([yh.numpy(), yh[:60].numpy()])
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    subsets = 3
    r = subprocess.run([sys.executable, str(ROOT / "examples/digits/evaluate.py"), str(tmp_path / "s.npz"),
                        "--subsets", str(subsets), "--json", str(tmp_path / "m.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert "denoising-autoencoder" in r.stdout

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # what the PNG round trip gives back
    ref = torch.from_numpy(to_uint8(xt)).permute(0, 3, 1, 2).float() / 127.5 - 1
    rng = np.random.default_rng(0)  # evaluate.py's subsets: seed 0, held-out size
    picks = [rng.permutation(len(images))[:len(yh)] for _ in range(subsets)]
    for key, model in (("fd2", judge), ("fd", load_classifier(ROOT / "assets/digits_classifier"))):
        f, fr = _feats(model, x), _feats(model, ref)
        fds = [_fd(f[i], fr) for i in picks]
        assert m[key] == pytest.approx(np.mean(fds), rel=1e-4), key
        assert m[f"{key}_std"] == pytest.approx(np.std(fds), rel=1e-2, abs=1e-5), key
        # the whole set: its FD, the means' term of it, and the features' spread against the training split's
        f, fr = np.float64(f), np.float64(fr)
        assert m[f"{key}_all"] == pytest.approx(_fd(f, fr), rel=1e-4), key
        assert m[f"{key}_all_mean"] == pytest.approx(((f.mean(0) - fr.mean(0)) ** 2).sum(), rel=1e-4), key
        spread = ((f - f.mean(0)) ** 2).sum() / (len(f) - 1) / (((fr - fr.mean(0)) ** 2).sum() / (len(fr) - 1))
        assert m[f"{key}_spread"] == pytest.approx(spread, rel=1e-4), key
    px, pr = images.reshape(len(images), -1).astype(np.float64), to_uint8(xt).reshape(len(xt), -1).astype(np.float64)
    assert m["pixel_spread"] == pytest.approx(px.var(0, ddof=1).sum() / pr.var(0, ddof=1).sum(), rel=1e-6)
    assert m["fd2_std"] > 0 and m["subset_size"] == len(yh) and m["subsets"] == subsets
