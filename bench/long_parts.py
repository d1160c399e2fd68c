"""Long parts out of square samples: each frame is `--across` images of one category side by side (a 1 x N strip,
like a long part under a line camera), a defective frame holding one defective image (and its mask) among good
ones (with its mask placed, where it has one). Every source image is used once, so no frame shares an image with a reference. The strips are written in the
MVTec layout that `anomalyd eval` reads, outside the repository (the samples' licences forbid copies in it).

    python bench/long_parts.py --data ../shared/data/inspection-samples --category metal_plate --across 3 \\
        --out /tmp/long-parts
    anomalyd eval --data /tmp/long-parts --model patchcore --shots 8 --seed 0 --resize squash
    anomalyd eval --data /tmp/long-parts --model patchcore --shots 8 --seed 0 --resize auto
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.datasets import discover


def strip(paths: list[Path], size: tuple[int, int], mode: str) -> Image.Image:
    width, height = size
    out = Image.new(mode, (width * len(paths), height))
    for i, path in enumerate(paths):
        out.paste(Image.open(path).convert(mode).resize(size), (i * width, 0))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--across", type=int, default=3, help="images per frame, side by side")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    samples = [s for s in discover(args.data, split="test") if s.category == args.category]
    rng = random.Random(args.seed)
    goods = [s for s in samples if s.label == 0]
    defects = [s for s in samples if s.label == 1]
    rng.shuffle(goods)
    rng.shuffle(defects)
    size = Image.open(goods[0].path).size
    # as many defective frames as good ones, each good frame `across` goods, each defective one `across - 1`
    n_good = min(len(goods) // (2 * args.across - 1), len(defects))
    n_defect = min(len(defects), (len(goods) - n_good * args.across) // (args.across - 1))
    root = args.out / f"{args.category}_x{args.across}"
    for folder in ("test/good", "test/defect"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    used = 0
    for i in range(n_good):
        strip([s.path for s in goods[used:used + args.across]], size, "RGB").save(root / "test/good" / f"{i:03d}.png")
        used += args.across
    for i in range(n_defect):
        images = [s.path for s in goods[used:used + args.across - 1]]
        used += args.across - 1
        where = rng.randrange(args.across)
        images.insert(where, defects[i].path)
        strip(images, size, "RGB").save(root / "test/defect" / f"{i:03d}.png")
        if not defects[i].has_mask:  # an image label only (cubes): so is the strip's
            continue
        mask = np.zeros((size[1], size[0] * args.across), dtype=np.uint8)
        defect_mask = np.array(Image.open(defects[i].mask_path).convert("L").resize(size, Image.NEAREST))
        mask[:, where * size[0]:(where + 1) * size[0]] = defect_mask
        (root / "ground_truth/defect").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "ground_truth/defect" / f"{i:03d}_mask.png")
    print(f"{root}: {n_good} good and {n_defect} defective frames of {size[0] * args.across}x{size[1]} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
