"""Mistakes that used to surface late or misleadingly are refused first, in one line, before any work."""
import json

from test_config_cli import run


def _cfg(tmp_path, teacher, **train):
    cfg = {"model": {"kind": "unet", "teacher": str(teacher)},
           "data": {"num_pairs": 12, "pair_steps": 3, "shard_size": 6, "pair_batch_size": 6},
           "train": {"batch_size": 4, "reg_batch_size": 4, "max_steps": 1, "sample_every": 0, **train}}
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    return p


def test_single_file_checkpoint_as_teacher_says_a_diffusers_folder_is_needed(tmp_path):
    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    ckpt.write_bytes(b"\0" * 64)
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, ckpt)), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "is a single file; the engine needs a diffusers folder" in r.stderr
    assert "from_single_file(" in r.stderr and "save_pretrained(" in r.stderr
    r = run("engine/make_pairs.py", "--config", str(_cfg(tmp_path, ckpt)), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "is a single file" in r.stderr, r.stderr


def test_missing_teacher_folder_is_named(tmp_path):
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tmp_path / "nowhere")), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and f"model.teacher: folder '{tmp_path / 'nowhere'}' not found" in r.stderr, r.stderr


def test_missing_lpips_backbone_is_reported_before_the_pairs_are_made(tmp_path, tiny_teacher_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_cache"))
    r = run("engine/train.py", "--config", str(_cfg(tmp_path, tiny_teacher_dir, lpips_backbone="pretrained")),
            "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "LPIPS needs the pretrained alex backbone" in r.stderr
    assert not (tmp_path / "r" / "pairs").exists()  # refused before any pair was made


def test_readme_coco_one_liner_makes_a_prompts_file(tmp_path):
    """The README's COCO-captions one-liner, run as written on a small captions file of the same layout."""
    import subprocess
    from conftest import ROOT
    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if "captions_train2014.json" in l
                and l.startswith("mkdir -p data"))
    (tmp_path / "annotations").mkdir()
    anns = [{"image_id": 1, "id": 1, "caption": "A dog  on a\nbeach. "}, {"image_id": 1, "id": 2, "caption": "A cat."},
            {"image_id": 2, "id": 3, "caption": "A dog on a beach."}]
    (tmp_path / "annotations/captions_train2014.json").write_text(json.dumps({"annotations": anns}))
    r = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # whitespace tidied (a caption's line break included), duplicates dropped, first-seen order kept
    assert (tmp_path / "data/captions.txt").read_text() == "A dog on a beach.\nA cat.\n"


def test_readme_coco30k_one_liner_takes_one_caption_per_image(tmp_path):
    """The README's COCO-30k prompts one-liner, as written, on a small val captions file (3 images, so all kept)."""
    import subprocess
    from conftest import ROOT
    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if "captions_val2014.json" in l
                and l.startswith("mkdir -p data"))
    (tmp_path / "annotations").mkdir()
    anns = [{"image_id": 7, "id": 9, "caption": "second  caption of 7"}, {"image_id": 7, "id": 2, "caption": "A red\nbus."},
            {"image_id": 3, "id": 5, "caption": "A cat."}, {"image_id": 4, "id": 6, "caption": "A dog."}]
    (tmp_path / "annotations/captions_val2014.json").write_text(json.dumps({"annotations": anns}))
    r = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "data/coco30k.txt").read_text().splitlines()
    assert sorted(lines) == ["A cat.", "A dog.", "A red bus."]  # one per image: the first by caption id, tidied
