"""What a training run reports: log.jsonl lines (means since the last line, not single noisy steps),
TensorBoard scalars and sample grids, and the progress bar's loss readout. Written by the main process only."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class Board:
    """TensorBoard scalars and sample grids (nothing when tensorboard is not installed or disabled)."""

    def __init__(self, folder: Path, enabled: bool):
        self.w = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.w = SummaryWriter(str(folder))
            except ImportError:
                pass

    def scalars(self, step: int, values: dict):
        if self.w is not None:
            for k, v in values.items():
                group = "loss" if k.startswith("loss") else "grad_norm" if k.startswith("grad") else \
                    "lr" if k.startswith("lr") else "memory" if k.startswith("peak") else "train"
                self.w.add_scalar(f"{group}/{k}", v, step)
            self.w.flush()

    def image(self, tag: str, png: Path, step: int):
        if self.w is not None:
            import numpy as np
            from PIL import Image
            self.w.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int):
        if self.w is not None:
            self.w.add_text(tag, text, step)

    def close(self):
        if self.w is not None:
            self.w.close()


class RunLog:
    """Accumulates each step's scalars; `line` writes their means (plus `extra`) to log.jsonl and TensorBoard."""

    def __init__(self, out: Path, main: bool, t_start: float):
        self.main, self.t_start = main, t_start
        self.file = open(out / "log.jsonl", "a") if main else None
        self.board = Board(out / "tb", main)
        self.sums: dict = {}
        self.counts: dict = {}
        self.notes: dict = {}

    def add(self, logs: dict):
        for k, v in logs.items():
            if math.isfinite(v):  # a skipped step's non-finite losses are counted, not averaged
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def line(self, step: int, rate: float, extra: dict) -> dict:
        """Writes one log line; returns the means (for the progress bar)."""
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        if self.main:
            self.file.write(json.dumps({"step": step, **means, "samples_per_s": rate, **extra,
                                        "time_s": time.time() - self.t_start, **self.notes}) + "\n")
            self.file.flush()
            self.board.scalars(step, {**means, **extra, "samples_per_s": rate})
        self.notes = {}
        return means

    def note(self, record: dict):
        """Facts for the next log line only (e.g. a resume and the config keys it changed); every line stays
        one step's record, and TensorBoard sees only scalars."""
        self.notes.update(record)

    def close(self):
        if self.file is not None:
            self.file.close()
        self.board.close()
