"""The small model of the service load test's long run: resnet18 with seeded random weights, 48 px,
fitted on 8 generated gradient-and-noise images and calibrated on 20 more (false-alarm rate 0.1).

    python benchmarks/make_tiny_model.py /tmp/tiny     # writes /tmp/tiny/patchcore_tiny.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from patchcore import PatchCore
from patchcore.deploy.calibration import calibrate
from patchcore.deploy.inference import Predictor


def good(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.tile(np.linspace(60, 180, 48, dtype=np.float32), (48, 1))
    return Image.fromarray(np.clip(base[..., None] + rng.normal(0, 8, (48, 48, 3)), 0, 255).astype(np.uint8))


def main(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    train = [good(i) for i in range(8)]
    model = PatchCore(
        backbone="resnet18",
        weights="random",
        resize=48,
        imagesize=48,
        device="cpu",
        percentage=0.5,
        batch_size=4,
    ).fit(train)
    model.calibration_ = calibrate(Predictor(model), [good(100 + i) for i in range(20)], 0.1, "generated")
    return model.save(out / "patchcore_tiny.pt")


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/out")))
