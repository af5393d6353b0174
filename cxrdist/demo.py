"""`cxrdist demo`: the whole pipeline on synthetic radiographs, sized for a 2-core laptop CPU:
synth -> prepare -> every fold trained by 2 CPU processes -> ensemble x TTA on the test split -> report.
"""

from __future__ import annotations

import time
from pathlib import Path

from cxrdist.data.datasets import load_manifest
from cxrdist.data.prepare import PrepareOptions, prepare
from cxrdist.data.synth.dataset import make_synthetic_dataset
from cxrdist.errors import UserError

# Package data (configs/demo.yaml in a checkout links to it), so `cxrdist demo` runs from an installed wheel too.
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
DEMO_IMAGES = 3000
DEMO_IMAGE_SIZE = 128  # rendered size; the demo config trains at 64 px
DEMO_FOLDS = 5
DEMO_PROCESSES = 2


def run_demo(out: Path) -> int:
    from cxrdist.evaluation.prediction.ensemble import run_evaluate
    from cxrdist.evaluation.report.report import run_report
    from cxrdist.training.launcher.launch import launch_fold

    out = Path(out).resolve()
    shards, runs = out / "shards", out / "runs"
    start = time.perf_counter()
    step(f"[1/5] synthesising {DEMO_IMAGES} radiographs in {out / 'synth'}")
    csv = make_synthetic_dataset(out / "synth", n=DEMO_IMAGES, size=DEMO_IMAGE_SIZE, seed=0, workers=2)
    step(f"[2/5] {DEMO_FOLDS} patient-grouped MIS folds + a test split, as shards in {shards}")
    if not (shards / "manifest.json").is_file():
        prepare(PrepareOptions(source="csv", csv=csv, images=out / "synth" / "images", out=shards, folds=DEMO_FOLDS,
                               test_fraction=0.2, max_size=DEMO_IMAGE_SIZE, samples_per_shard=250, workers=2,
                               attributes="sex,age"))  # the subgroup audit's attributes (the view is kept anyway)
    else:
        print(f"  (reusing {shards})")
    overrides = [f"data.shards={shards}", f"output_dir={runs}"]
    for fold in range(load_manifest(shards).num_folds):
        step(f"[3/5] training fold {fold} of {DEMO_FOLDS} with {DEMO_PROCESSES} CPU processes")
        code = launch_fold(DEMO_CONFIG, fold, overrides, DEMO_PROCESSES, None)
        if code != 0:
            raise UserError(f"training fold {fold} failed (exit {code}); see the output above")
    experiment = runs / "demo"
    step("[4/5] fold ensemble x horizontal-flip TTA on the test split")
    metrics = run_evaluate(experiment, "test", True, None, 64, 2)
    step("[5/5] report")
    page = run_report(experiment)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nensemble macro AUC on the synthetic test split: {metrics['ensemble']['macro_auc']:.4f}")
    print(f"report: {page}")
    print(f"demo finished in {minutes:.1f} min")
    return 0


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)
