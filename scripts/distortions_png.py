"""A PNG grid of what each distortion does to MNIST digits (for the README).

    python scripts/distortions_png.py [--out docs/distortions.png] [--amounts 15,0.15,0.3,2,0.2]

Row by row: the originals, then each distortion alone at the given amount (rotation in
degrees, scale and shear as fractions, shift in pixels, noise as a standard deviation),
then all together; every image drawn with its own random amounts, as in training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from psgd.data import load_mnist
from psgd.data.augment import DistortionSpec, distort

NAMES = ("rotate", "scale", "shear", "shift", "noise")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/distortions.png")
    ap.add_argument("--amounts", default="15,0.15,0.3,2,0.2", help="rotate,scale,shear,shift,noise")
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    amounts = dict(zip(NAMES, (float(a) for a in args.amounts.split(","))))
    _, test = load_mnist()
    originals = test.X[:args.columns].copy()
    rows = [("original", originals)]
    for name in NAMES:
        rows.append((f"{name} {amounts[name]:g}", DistortionSpec(**{name: amounts[name]})))
    rows.append(("all together", DistortionSpec(**amounts)))
    fig, axes = plt.subplots(len(rows), args.columns, figsize=(args.columns * 0.9, len(rows) * 0.95))
    for r, (label, what) in enumerate(rows):
        images = what if isinstance(what, np.ndarray) else originals.copy()
        if not isinstance(what, np.ndarray):
            distort(images, (28, 28), what, np.random.default_rng(args.seed + r))
        for c in range(args.columns):
            ax = axes[r, c]
            ax.imshow(images[c].reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
