"""Models: noise schedules, the denoiser interface, the one-step generator, samplers and the toy 2-D models.
Nothing here imports engine/ or deepspeed."""
from .schedules import NoiseSchedule
from .denoiser import Denoiser, OneStepGenerator, ModelFolderError, trainable_copy, weights_hash

__all__ = ["NoiseSchedule", "Denoiser", "OneStepGenerator", "ModelFolderError", "trainable_copy", "weights_hash"]
