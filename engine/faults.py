"""Fault injection for the tests, read from the environment, so the training loop itself carries no test code.

    DMD_TEST_NAN_AT_STEP=k    poisons step k's generator loss with NaN ("k-": every step from k on)
    DMD_TEST_KILL_AT_STEP=k   SIGKILLs the process after step k
    DMD_TEST_KILL_IN_SAVE=k   SIGKILLs a ZeRO-3 process midway through writing step k's checkpoint
    DMD_TEST_KILL_IN_SHARD=k  SIGKILLs a pairs or real-data job (engine/encode_real.py, write_pixel_folder) after
                              its k-th shard's parts, before that shard's record
"""
from __future__ import annotations

import os
import signal


def kill_hook(var: str, step: int):
    """SIGKILL this process when the environment variable `var` names this step."""
    if os.environ.get(var) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_steps() -> range | tuple:
    """The steps DMD_TEST_NAN_AT_STEP poisons (none when it is unset)."""
    v = os.environ.get("DMD_TEST_NAN_AT_STEP", "")
    if not v:
        return ()
    first = int(v.rstrip("-"))
    return range(first, 1 << 62 if v.endswith("-") else first + 1)


def after_step(step: int):
    kill_hook("DMD_TEST_KILL_AT_STEP", step)
