"""What engine/train.py refuses before any work, beyond each value's own check (engine/config.py): the
combinations of settings across sections, and the files they name. Each refusal is one DMDError line."""
from pathlib import Path

from .backend import gan_on
from .errors import DMDError
from .files import resolve_path
from .kinds import model_kind, teacher_folder
from .losses import check_regression_loss
from .warmstart import init_files


def check_config(cfg, args):
    """args: the parsed command line of engine/train.py (out, resume, max_steps)."""
    tc = cfg.train
    if args.max_steps is not None and args.max_steps < 0:
        raise DMDError(f"--max-steps must be >= 0, got {args.max_steps}")
    if model_kind(cfg.model.kind).folder:
        teacher_folder(cfg)  # a single-file checkpoint or a missing folder, before any work
    elif cfg.model.init_from:
        raise DMDError(f"model.init_from needs a UNet teacher (model.kind unet or sd15), not '{cfg.model.kind}'")
    if cfg.model.init_from and not args.resume:  # the run's files now; the teacher's hash once it is loaded
        if resolve_path(cfg.model.init_from).resolve() == Path(args.out).resolve():
            raise DMDError("model.init_from names this run's own --out; start the new run in another folder")
        init_files(cfg.model.init_from)
    try:
        check_regression_loss(tc)  # before hours of pair making, not after
    except FileNotFoundError as e:
        raise DMDError(str(e)) from None
    if tc.reg_weight > 0 and tc.reg_batch_size > cfg.data.num_pairs:
        raise DMDError(f"train.reg_batch_size = {tc.reg_batch_size} is larger than data.num_pairs = "
                       f"{cfg.data.num_pairs}")
    if tc.gan_weight_generator > 0 and tc.gan_weight_fake == 0:
        raise DMDError("train.gan_weight_generator > 0 needs train.gan_weight_fake > 0: the discriminator head "
                       "is trained only by the fake score's GAN loss")
    if tc.gan_real_dequantize > 0 and tc.gan_weight_fake == 0:
        raise DMDError("train.gan_real_dequantize > 0 needs the GAN (train.gan_weight_fake > 0): only the "
                       "discriminator sees real data")
    if gan_on(tc) and (tc.fake_score != "learned" or tc.dm_weight == 0):
        raise DMDError("DMD2's GAN lives on the learned fake score: it needs train.fake_score = learned and "
                       "train.dm_weight > 0")
    if tc.gan_weight_fake > 0:
        if not cfg.data.real_data:
            raise DMDError("train.gan_weight_fake > 0 needs real data: set data.real_data to a real-data folder "
                           "(assets/digits_real for the digits; engine/encode_real.py makes one from images)")
        if not resolve_path(cfg.data.real_data).is_dir():
            raise DMDError(f"data.real_data: folder '{cfg.data.real_data}' not found")
    if tc.generator_timesteps:
        if not model_kind(cfg.model.kind).folder:
            raise DMDError(f"train.generator_timesteps needs a UNet teacher (model.kind unet or sd15), not "
                           f"'{cfg.model.kind}'")
        if model_kind(cfg.model.kind).text and 0 in tc.generator_timesteps:
            raise DMDError("train.generator_timesteps: a step at t = 0 cannot be exported as a stock "
                           "StableDiffusionPipeline (its LCMScheduler returns its input at t = 0); end at t >= 1")
        if tc.reg_weight > 0 and len(tc.generator_timesteps) > 1:
            raise DMDError("train.reg_weight > 0 needs a one-step generator: the regression pairs map one noise to "
                           "one teacher output; set train.reg_weight = 0 for train.generator_timesteps with several "
                           "steps (DMD2 trains them without pairs)")
        if tc.compile and len(tc.generator_timesteps) > 1:
            raise DMDError("train.compile supports a one-step generator only; set train.compile = false for "
                           "train.generator_timesteps with several steps")
