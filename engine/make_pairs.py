"""Make the regression pairs (z, y = teacher ODE(z)) for a config, with a progress bar.

    python engine/make_pairs.py --config configs/digits.json --out runs/digits
    deepspeed --num_gpus 8 engine/make_pairs.py --config C --out D     # 8 processes, one share of the shards each
    deepspeed --hostfile H engine/make_pairs.py --config C --out D     # several nodes: D on a shared file system

Writes OUT/pairs/ (or data.pairs_dir when set): sharded .npy files and manifest.json, the same bytes from one
process or many (engine/pairs_job.py; on the CPU give every run the same train.threads). The teacher is whole on
each process, on its GPU when there is one (train.device). train.py calls the same code when the pairs are
missing. A run killed midway keeps its complete shards: run it again to make the rest. Complete pairs for this
teacher and config are kept (nothing to do); pairs made for another one are refused in one line unless
--overwrite, which keeps every shard that is intact and this config's and remakes the rest.
"""
import _bootstrap  # noqa: F401

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from engine import cli
from engine.config import DMDConfig, load
from engine.errors import DMDError, PairsError
from engine.files import ensure_dir
from engine.kinds import load_teacher
from engine.pairs import PairReader, expected_manifest, write_pairs
from engine.pairs_job import Solo
from engine.plain import resolve_device
from engine.text2image import condition_count, load_text


class ProcessGroup:
    """torch.distributed's default group, seen as pairs_job sees a backend."""

    def __init__(self, backend: str):
        from engine.distributed import init_distributed
        init_distributed(backend)
        self.dist = torch.distributed
        self.rank, self.world_size = self.dist.get_rank(), self.dist.get_world_size()

    def barrier(self):
        self.dist.barrier()

    def gather(self, obj) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def close(self):
        # ranks leave together, as the ZeRO-3 backend's do: a rank that tore its group down while rank 0 still
        # read the folder was once seen to abort at exit (SIGABRT in gloo's teardown) after a complete job
        self.dist.barrier()
        self.dist.destroy_process_group()


def existing(folder: Path, expect: dict) -> str | None:
    """None: no manifest (pairs to make); "": complete pairs for this run; else what is wrong with them."""
    if not (folder / "manifest.json").is_file():
        return None
    try:
        PairReader(folder, expect)
        return ""
    except PairsError as e:
        return str(e)


def main():
    p = cli.parser(__doc__)
    p.add_argument("--overwrite", action="store_true", help="replace complete pairs made for another teacher or config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args()
    cfg = load(args.config, DMDConfig, args.set)
    cli.set_threads(cfg.train.threads)  # on the CPU, y's bytes depend on the thread count
    group = ProcessGroup(cfg.deepspeed.backend) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else Solo()
    out = ensure_dir(args.out)
    folder = Path(cfg.data.pairs_dir) if cfg.data.pairs_dir else out / "pairs"
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and group.world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    teacher, h = load_teacher(cfg)
    teacher.to(device)
    text = load_text(cfg, teacher, device)  # after the move: the teacher's null condition is made on `device`
    expect = expected_manifest(h, cfg.data, teacher.sample_shape, condition_count(teacher, text), text)
    # rank 0 reads the folder and every rank follows its verdict, so all of them stop or go on together
    state = group.gather(existing(folder, expect) if group.rank == 0 else None)[0]
    if state == "" and group.rank == 0:
        print(f"{cfg.data.num_pairs} pairs for this teacher and config are already complete in {folder}; nothing to do")
    elif state and not args.overwrite:
        if group.rank:
            sys.exit(cli.EXIT_BAD_INPUT)  # rank 0 says why, once
        raise DMDError(f"{folder} holds other or damaged pairs; pass --overwrite to remake them, or set "
                       f"data.pairs_dir elsewhere ({state})")
    elif state != "":
        t0 = time.time()
        write_pairs(folder, teacher, h, cfg.data, text=text, group=group)
        if group.rank == 0:
            reader = PairReader(folder, expect)
            print(f"{len(reader)} pairs in {folder} ({time.time() - t0:.1f} s)")
    if group.world_size > 1:
        group.close()


if __name__ == "__main__":
    cli.main_guard(main)
