"""`cxrdist demo --two-datasets`: several datasets end to end on synthetic radiographs, on a CPU:
two "hospitals" (other seeds; the second spells Pleural Effusion the NIH way and does not annotate two findings)
prepared separately -> every fold trained on both by 2 CPU processes -> the ensemble on both test splits (per-dataset
and pooled AUC) -> external validation on a third hospital -> report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from cxrdist.data.prepare import PrepareOptions, prepare
from cxrdist.data.synth.dataset import make_synthetic_dataset
from cxrdist.data.synth.label_table import COHORT_COLUMNS
from cxrdist.demo import DEMO_CONFIG, DEMO_PROCESSES, step
from cxrdist.errors import UserError

HOSPITAL_IMAGES = 500
EXTERNAL_IMAGES = 250
IMAGE_SIZE = 96
FOLDS = 2
NIH_SPELLING = {"Pleural Effusion": "Effusion"}
NOT_ANNOTATED_AT_B = ["Fracture", "Support Devices"]


def prepare_hospital(out: Path, seed: int, n: int, rename: dict | None = None, drop: list[str] | None = None) -> Path:
    shards = out.parent / "shards" / out.name  # the directory name is the dataset's name in CSVs and metrics
    if (shards / "manifest.json").is_file():
        print(f"  (reusing {shards})")
        return shards
    csv = make_synthetic_dataset(out / "synth", n=n, size=IMAGE_SIZE, seed=seed, workers=2, progress=False)
    table = pd.read_csv(csv, dtype={"patient": str, "study": str})
    table = table.drop(columns=drop or []).rename(columns=rename or {})
    table.to_csv(csv, index=False)
    labels = ",".join(c for c in table.columns if c not in COHORT_COLUMNS)
    prepare(PrepareOptions(source="csv", csv=csv, images=out / "synth" / "images", out=shards, folds=FOLDS, test_fraction=0.2,
                           max_size=IMAGE_SIZE, samples_per_shard=100, workers=2, labels=labels, progress=False))
    return shards


def run_two_dataset_demo(out: Path) -> int:
    from cxrdist.evaluation.scoring.by_dataset import summary_line
    from cxrdist.evaluation.prediction.ensemble import run_evaluate
    from cxrdist.evaluation.report.report import run_report
    from cxrdist.training.launcher.launch import launch_fold

    out = Path(out).resolve()
    start = time.perf_counter()
    step(f"[1/5] two hospitals of {HOSPITAL_IMAGES} radiographs, prepared separately ({FOLDS} folds + a test split each)")
    a = prepare_hospital(out / "hospital-a", seed=0, n=HOSPITAL_IMAGES)
    b = prepare_hospital(out / "hospital-b", seed=1, n=HOSPITAL_IMAGES, rename=NIH_SPELLING, drop=NOT_ANNOTATED_AT_B)
    external = prepare_hospital(out / "hospital-c", seed=2, n=EXTERNAL_IMAGES, rename=NIH_SPELLING)
    shards = [{"location": str(a), "name": "a"}, {"location": str(b), "name": "b"}]
    overrides = [f"data.shards={json.dumps(shards)}", f"output_dir={out / 'runs'}", "experiment=two-datasets", "train.epochs=4"]
    for fold in range(FOLDS):
        step(f"[2/5] training fold {fold} of {FOLDS} on hospitals a + b with {DEMO_PROCESSES} CPU processes")
        code = launch_fold(DEMO_CONFIG, fold, overrides, DEMO_PROCESSES, None)
        if code != 0:
            raise UserError(f"training fold {fold} failed (exit {code}); see the output above")
    experiment = out / "runs" / "two-datasets"
    step("[3/5] fold ensemble x TTA on both test splits")
    internal = run_evaluate(experiment, "test", True, None, 64, 2)
    step("[4/5] external validation on hospital c (never trained on), all of it")
    outside = run_evaluate(experiment, "all", True, None, 64, 2, external=external)  # into runs/EXP/external/hospital-c
    step("[5/5] report")
    page = run_report(experiment)
    print(f"\ninternal test, per dataset: {summary_line(internal['per_dataset'])}")
    print(f"external (hospital c): {summary_line(outside['per_dataset'])}")
    print(f"report: {page}")
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0
