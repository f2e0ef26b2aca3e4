"""Train the digits classifier used as the evaluation feature extractor.

    python examples/digits/train_classifier.py --out assets/digits_classifier [--epochs 60]
"""
if __name__ == "__main__":  # run as a script from a checkout: the repo root on sys.path
    import _bootstrap  # noqa: F401

import argparse

import torch
import torch.nn.functional as F

from engine import cli
from examples.digits.classifier import DigitsClassifier, save_classifier
from examples.digits.data import load_digits


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x, y = load_digits("train")
    xh, yh = load_digits("heldout")
    m = DigitsClassifier()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-4)
    for ep in range(args.epochs):
        m.train()
        perm = torch.randperm(len(x))
        for b in range(0, len(x), 64):
            i = perm[b: b + 64]
            xb = x[i]
            # a one-pixel random shift and light noise: the classifier should not depend on exact pixels
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            xb = torch.roll(xb, (dx, dy), (2, 3)) + 0.05 * torch.randn_like(xb)
            loss = F.cross_entropy(m(xb), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (ep + 1) % 10 == 0:
            m.eval()
            with torch.no_grad():
                acc = (m(xh).argmax(1) == yh).float().mean().item()
            print(f"epoch {ep + 1}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    save_classifier(m, args.out, {"heldout_accuracy": acc, "epochs": args.epochs, "seed": args.seed})
    print(f"saved {args.out}")


if __name__ == "__main__":
    cli.main_guard(main)
