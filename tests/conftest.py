import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)
torch.set_flush_denormal(True)  # as engine/train.py: subnormals are ~100x slower on x86 CPUs


def tiny_denoiser(kind: str = "edm", prediction_type: str = "epsilon", seed: int = 0):
    """A small class-conditional UNet2DModel teacher with random weights (8x8, 1 channel)."""
    from diffusers import UNet2DModel
    from models import Denoiser, NoiseSchedule
    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=8, num_class_embeds=11)
    sch = NoiseSchedule.edm() if kind == "edm" else NoiseSchedule.vp(1000, 1e-4, 0.02, "linear")
    return Denoiser(net, sch, prediction_type, 10, 10, (1, 8, 8))


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "tiny_teacher"
    tiny_denoiser().save_pretrained(d)
    return d
