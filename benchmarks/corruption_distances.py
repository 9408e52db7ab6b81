"""How far each corruption moves an image, by severity: the mean absolute pixel difference (0-255) from the clean
image over CIFAR-10 test images, for clipforge's corruptions and, for the two it re-spaces, CIFAR-10-C's published
parameters.

    python benchmarks/corruption_distances.py [--images 100]
"""
from __future__ import annotations

import argparse
import io
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.evaluate import corruptions as C

REPO = Path(__file__).resolve().parents[1]


def distances(function, photos) -> list[float]:
    out = []
    for severity in C.SEVERITIES:
        d = [np.abs(np.clip(function(p.copy(), severity, np.random.default_rng([0, i])), 0, 1) - p).mean() * 255
             for i, p in enumerate(photos)]
        out.append(float(np.mean(d)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    photos = []
    with tarfile.open(args.data / "cifar10" / "test" / "test-000000.tar") as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(photos) < args.images:
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                photos.append(np.asarray(image, dtype=np.float32) / 255)
    rows = {name: function for name, function in C.CORRUPTIONS.items()}
    rows["glass_blur (CIFAR-10-C parameters)"] = partial(C.glass_blur, table=C.CIFAR10C_GLASS_BLUR)
    rows["elastic_transform (CIFAR-10-C parameters)"] = partial(C.elastic_transform, table=C.CIFAR10C_ELASTIC)
    print(f"| corruption ({len(photos)} CIFAR-10 test images) | severity 1 | 2 | 3 | 4 | 5 |")
    print("|---|---|---|---|---|---|")
    for name, function in rows.items():
        print(f"| {name} | " + " | ".join(f"{d:.1f}" for d in distances(function, photos)) + " |")


if __name__ == "__main__":
    main()
