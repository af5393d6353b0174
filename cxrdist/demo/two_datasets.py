"""`cxrdist demo --two-datasets`: several datasets end to end on synthetic radiographs, on a CPU, in a folder of its own
(default demo-out-two-datasets/): two hospitals, hospital-a and hospital-b (other seeds; hospital-b spells Pleural Effusion
the NIH way and does not annotate two findings), prepared separately -> every fold trained on both by 2 CPU processes -> the
ensemble on both test splits (per-dataset and pooled AUC) -> external validation on a third, hospital-c -> report.
A second run reuses what the first finished, as `cxrdist demo` does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from cxrdist.data.ingest.prepare import PrepareOptions, prepare
from cxrdist.data.synth.dataset import make_synthetic_dataset
from cxrdist.data.synth.label_table import COHORT_COLUMNS
from cxrdist.demo.one_dataset import DEMO_PROCESSES, DemoSteps, evaluated, reported, step, train_folds
from cxrdist.layout import METRICS_FILE

DEFAULT_OUT = Path("demo-out-two-datasets")
HOSPITAL_IMAGES = 500
EXTERNAL_IMAGES = 250
IMAGE_SIZE = 96
FOLDS = 2
NIH_SPELLING = {"Pleural Effusion": "Effusion"}
NOT_ANNOTATED_AT_B = ["Fracture", "Support Devices"]
# About 50 optimizer steps per fold: an EMA decay of 0.9 is reached at step 32 of timm's warm-up (0.98, the single demo's,
# only at step 354), so the EMA averages over the run instead of still warming up at its end.
TRAINING = ["experiment=two-datasets", "train.epochs=4", "train.ema_decay=0.9"]


def prepare_hospital(out: Path, name: str, seed: int, n: int, rename: dict | None = None, drop: list[str] | None = None) -> Path:
    """OUT/synth/NAME (images, labels.csv) prepared into OUT/shards/NAME (the directory name is the dataset's name in CSVs,
    metrics and the report); an earlier run's shards are reused."""
    shards = out / "shards" / name
    spelling = f"; spells {', '.join(f'{a} as {b}' for a, b in (rename or {}).items())}" if rename else ""
    unlabelled = f"; does not annotate {', '.join(drop)}" if drop else ""
    print(f"\n-- {name}: {n} radiographs (seed {seed}{spelling}{unlabelled})", flush=True)
    if (shards / "manifest.json").is_file():
        print(f"  (reusing {shards})")
        return shards
    synth = out / "synth" / name
    csv = make_synthetic_dataset(synth, n=n, size=IMAGE_SIZE, seed=seed, workers=2, progress=False)
    table = pd.read_csv(csv, dtype={"patient": str, "study": str})
    table = table.drop(columns=drop or []).rename(columns=rename or {})
    table.to_csv(csv, index=False)
    labels = ",".join(c for c in table.columns if c not in COHORT_COLUMNS)
    print(f"   its folds and test split ({name}):", flush=True)
    prepare(PrepareOptions(source="csv", csv=csv, images=synth / "images", out=shards, folds=FOLDS, test_fraction=0.2,
                           max_size=IMAGE_SIZE, samples_per_shard=100, workers=2, labels=labels, progress=False))
    return shards


def run_two_dataset_demo(out: Path | None) -> int:
    from cxrdist.evaluation.scoring.by_dataset import summary_line
    from cxrdist.evaluation.prediction.ensemble import run_evaluate

    out = Path(out if out is not None else DEFAULT_OUT).resolve()
    steps = DemoSteps(out)
    start = time.perf_counter()
    step(f"[1/5] two hospitals of {HOSPITAL_IMAGES} radiographs, prepared separately ({FOLDS} folds + a test split each), "
         f"and a third for external validation, in {out}")
    a = prepare_hospital(out, "hospital-a", seed=0, n=HOSPITAL_IMAGES)
    b = prepare_hospital(out, "hospital-b", seed=1, n=HOSPITAL_IMAGES, rename=NIH_SPELLING, drop=NOT_ANNOTATED_AT_B)
    external = prepare_hospital(out, "hospital-c", seed=2, n=EXTERNAL_IMAGES, rename=NIH_SPELLING)
    shards = [{"location": str(a), "name": a.name}, {"location": str(b), "name": b.name}]
    runs = out / "runs"
    experiment = runs / "two-datasets"
    train_folds(steps, experiment, [f"data.shards={json.dumps(shards)}", f"output_dir={runs}", *TRAINING], FOLDS, "[2/5]",
                f"on {a.name} + {b.name} with {DEMO_PROCESSES} CPU processes")
    step(f"[3/5] fold ensemble x TTA on the test splits of {a.name} and {b.name}")
    internal = evaluated(steps, "evaluate", experiment, lambda: run_evaluate(experiment, "test", True, None, 64, 2))
    step(f"[4/5] external validation on {external.name} (never trained on), all of it")
    outside = evaluated(steps, "evaluate-external", experiment, lambda: run_evaluate(experiment, "all", True, None, 64, 2, external=external),
                        {"external": str(external)})
    step("[5/5] report")
    page = reported(steps, experiment, [Path(m["out"]) / METRICS_FILE for m in (internal, outside)])
    print(f"\ninternal test, per dataset: {summary_line(internal['per_dataset'])}")
    print(f"external ({external.name}): {summary_line(outside['per_dataset'])}")
    print(f"report: {page}")
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0
