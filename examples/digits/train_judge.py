"""Train the second digits judge (a denoising autoencoder, examples/digits/judge.py) on the training split.

    python examples/digits/train_judge.py --out assets/digits_judge [--epochs 60] [--seed 1]

Deterministic for a given seed: training runs on one thread (for a net this small that is also the fastest),
so the weights do not depend on the machine's core count. Labels are never used, and the held-out split is
never touched: it is what the judge's real-data floor is measured on.
"""
if __name__ == "__main__":  # run as a script from a checkout: the repo root on sys.path
    import _bootstrap  # noqa: F401

import argparse
import time

import torch
import torch.nn.functional as F

from engine import cli
from examples.digits.data import load_digits
from examples.digits.judge import DigitsJudge, save_judge


def train(epochs: int = 60, seed: int = 1, noise: float = 0.05, batch_size: int = 64, lr: float = 2e-3,
          log=None) -> tuple[DigitsJudge, dict]:
    """(judge, what to record of the run). Its own generator drives init, order and noise: reproducible whatever
    ran before in the process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed, noise, batch_size, lr, log)
    finally:
        torch.set_num_threads(threads)


def _train(epochs, seed, noise, batch_size, lr, log):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = DigitsJudge()
    x, _ = load_digits("train")
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch_size))
    m.train()
    for ep in range(epochs):
        perm, total = torch.randperm(len(x), generator=g), 0.0
        for b in range(0, len(x), batch_size):
            xb = x[perm[b: b + batch_size]]
            # a noise level per image, zero included: the code must keep what tells clean digits apart, while
            # small perturbations do not move it far (the reconstruction target is always the clean digit)
            sigma = noise * torch.rand(len(xb), 1, 1, 1, generator=g)
            loss = F.mse_loss(m(xb + sigma * torch.randn(xb.shape, generator=g)), xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(xb)
        if log and ((ep + 1) % 10 == 0 or ep + 1 == epochs):
            log(f"epoch {ep + 1}: reconstruction mse {total / len(x):.5f}")
    m.eval().requires_grad_(False)
    with torch.no_grad():
        mse = F.mse_loss(m(x), x).item()
    return m, {"objective": "denoising reconstruction (mse)", "noise": noise, "epochs": epochs, "seed": seed,
               "train_mse": round(mse, 6)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--noise", type=float, default=0.05, help="largest noise std of the denoising objective")
    args = p.parse_args()
    t0 = time.time()
    m, meta = train(args.epochs, args.seed, args.noise, log=print)
    save_judge(m, args.out, meta)
    print(f"saved {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    cli.main_guard(main)
