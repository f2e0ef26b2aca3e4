import json
import subprocess
import sys

import pytest

from engine.config import ConfigError, DMDConfig, load, parse
from examples.digits.train_teacher import TeacherConfig
from conftest import ROOT


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", ["digits.json", "toy2d.json", "digits_zero3.json"])
def test_shipped_dmd_configs_parse(name):
    cfg = load(ROOT / "configs" / name, DMDConfig)
    assert cfg.train.dm_weight == 1.0 and cfg.train.reg_weight > 0


def test_sd15_dmd2_configs_are_dmd2s_two_phases():
    """DMD2's SD1.5 runs (tianweiy/DMD2, experiments/sdv1.5): TTUR 10 and guidance 1.75 throughout; lr 1e-5 without
    the GAN, then lr 5e-7 with GAN weights 1e-3 / 1e-2, started from the first phase's generator and fake score."""
    one = load(ROOT / "configs" / "sd15_dmd2_zero3.json", DMDConfig)
    two = load(ROOT / "configs" / "sd15_dmd2_gan_zero3.json", DMDConfig)
    for c in (one, two):
        tc = c.train
        assert (tc.fake_updates_per_generator, tc.real_guidance, tc.reg_weight) == (10, 1.75, 0.0)
        assert tc.betas == [0.9, 0.999]
        assert c.deepspeed.enabled and c.model.teacher == one.model.teacher
    assert (one.train.gan_weight_generator, one.train.gan_weight_fake, one.data.real_data) == (0.0, 0.0, "")
    assert one.train.lr_generator == one.train.lr_fake == 1e-5 and not one.model.init_from
    assert (two.train.gan_weight_generator, two.train.gan_weight_fake) == (1e-3, 1e-2) and two.data.real_data
    assert two.train.lr_generator == two.train.lr_fake == 5e-7
    assert two.model.init_from == "runs/sd15_dmd2"  # the first phase's --out in the README


def test_defaults_are_the_papers():
    cfg = parse(DMDConfig, {})
    assert cfg.train.reg_weight == 0.25  # L_DM + 0.25 L_reg
    assert (cfg.train.min_t_frac, cfg.train.max_t_frac) == (0.02, 0.98)


def test_shipped_teacher_config_parses():
    assert load(ROOT / "configs" / "digits_teacher.json", TeacherConfig).unet["sample_size"] == 8


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"train: unknown key 'lr_gen'"):
        parse(DMDConfig, {"train": {"lr_gen": 1e-4}}, "config x.json")


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train.batch_size must be int, got str"):
        parse(DMDConfig, {"train": {"batch_size": "64"}}, "config x.json")
    with pytest.raises(ConfigError, match=r"train.batch_size must be int, got bool"):
        parse(DMDConfig, {"train": {"batch_size": True}}, "config x.json")
    assert parse(DMDConfig, {"train": {"lr_fake": 1}}).train.lr_fake == 1.0  # ints are fine for floats


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"teacher": "x"}, "train": {"max_step": 3}}))
    r = run("engine/train.py", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown key 'max_step'" in r.stderr, r.stderr


def test_cli_missing_teacher_folder(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"teacher": str(tmp_path / "no_teacher")}}))
    r = run("engine/train.py", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "no_teacher' not found" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_cli_missing_config_file(tmp_path):
    r = run("engine/make_pairs.py", "--config", str(tmp_path / "nope.json"), "--out", str(tmp_path))
    assert r.returncode == 2 and "nope.json' not found" in r.stderr


def test_set_override_is_validated(tmp_path):
    r = run("engine/train.py", "--config", "configs/toy2d.json", "--out", str(tmp_path / "r"),
            "--set", "train.grad_clip=big")
    assert r.returncode == 2 and "train.grad_clip must be float, got str" in r.stderr, r.stderr
