"""`cxrdist demo`: the pipeline end to end on synthetic radiographs, sized for a laptop CPU."""

from __future__ import annotations

from pathlib import Path

from cxrdist.data.prepare import PrepareOptions, prepare
from cxrdist.data.synth import make_synthetic_dataset

DEMO_IMAGES = 3000
DEMO_IMAGE_SIZE = 256
DEMO_FOLDS = 5


def run_demo(out: Path) -> int:
    out = Path(out)
    synth_dir = out / "synth"
    shards = out / "shards"
    print(f"[1/2] synthesising {DEMO_IMAGES} radiographs in {synth_dir}")
    csv = make_synthetic_dataset(synth_dir, n=DEMO_IMAGES, size=DEMO_IMAGE_SIZE, seed=0, workers=2)
    print(f"[2/2] preparing {DEMO_FOLDS} patient-grouped MIS folds + a test split as shards in {shards}")
    prepare(
        PrepareOptions(
            source="csv", csv=csv, images=synth_dir / "images", out=shards, folds=DEMO_FOLDS,
            test_fraction=0.2, max_size=DEMO_IMAGE_SIZE, samples_per_shard=250, workers=2,
        )
    )
    print(f"shards and manifest.json in {shards}")
    return 0
