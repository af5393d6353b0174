"""`cxrdist demo`: the whole pipeline on synthetic radiographs, sized for a 2-core laptop CPU:
synth -> prepare -> every fold trained by 2 CPU processes -> ensemble x TTA on the test split -> report.

A second run in the same folder redoes nothing it can reuse (DemoSteps): the images, the shards, every trained fold, the
evaluation and the report are reused when what they were made from has not changed, and it says so.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from cxrdist import __version__
from cxrdist.atomic import atomic_write_text
from cxrdist.data.datasets import load_manifest
from cxrdist.data.ingest.prepare import PrepareOptions, prepare
from cxrdist.data.synth.dataset import make_synthetic_dataset
from cxrdist.errors import UserError
from cxrdist.layout import BEST_DIR, CARD_FILE, METRICS_FILE, REPORT_DIR, WEIGHTS_FILE, fold_best_dirs, fold_name

# Package data (configs/demo.yaml in a checkout links to it), so `cxrdist demo` runs from an installed wheel too.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_IMAGES = 3000
DEMO_IMAGE_SIZE = 128  # rendered size; the demo config trains at 64 px
DEMO_FOLDS = 5
DEMO_PROCESSES = 2
STEPS_FILE = "demo-steps.json"
REPORT_PAGE = "report.html"


class DemoSteps:
    """What an earlier demo run in OUT finished: per step, a record of what it was made from (OUT/demo-steps.json, written
    as each step ends). A step is reused when its record is unchanged and its outputs are there."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / STEPS_FILE
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def reusable(self, step: str, made_from: dict, *outputs: Path) -> bool:
        return self.done.get(step) == json.loads(json.dumps(made_from)) and all(Path(p).exists() for p in outputs)

    def finished(self, step: str, made_from: dict) -> None:
        self.done[step] = json.loads(json.dumps(made_from))
        atomic_write_text(self.path, json.dumps(self.done, indent=1))


def training_inputs(config: Path, overrides: list[str]) -> dict:
    return {"config": hashlib.sha256(Path(config).read_bytes()).hexdigest(), "overrides": overrides, "processes": DEMO_PROCESSES}


def models_of(experiment: Path) -> dict:
    """The trained models an evaluation is made from: each fold's weights file, by size and modification time."""
    weights = [d / WEIGHTS_FILE for d in fold_best_dirs(experiment)]
    return {"version": __version__, "models": [[p.parent.parent.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]}


def file_stamp(path: Path) -> list:
    return [str(path), path.stat().st_size, path.stat().st_mtime_ns]


def train_folds(steps: DemoSteps, experiment: Path, overrides: list[str], folds: int, stage: str, what: str) -> None:
    """Every fold not already trained by an earlier run with the same config and overrides; notes said once at the end."""
    from cxrdist.training.launcher.launch import launch_fold
    from cxrdist.training.launcher.notes import collected_notes

    made_from = training_inputs(DEMO_CONFIG, overrides)
    with collected_notes():
        for fold in range(folds):
            step(f"{stage} training fold {fold} of {folds} {what}")
            if steps.reusable(fold_name(fold), made_from, experiment / fold_name(fold) / BEST_DIR / CARD_FILE):
                print(f"  (reusing {experiment / fold_name(fold)}, trained by an earlier run)")
                continue
            code = launch_fold(DEMO_CONFIG, fold, overrides, DEMO_PROCESSES, None)
            if code != 0:
                raise UserError(f"training fold {fold} failed (exit {code}); see the output above")
            steps.finished(fold_name(fold), made_from)


def evaluated(steps: DemoSteps, name: str, experiment: Path, evaluate, inputs: dict | None = None) -> dict:
    """`evaluate()`'s metrics, or those an earlier run wrote from the same models (and `inputs`); the record keeps where
    the evaluation wrote them (its metrics' "out")."""
    made_from = {**models_of(experiment), **(inputs or {})}
    earlier = steps.done.get(name) or {}
    metrics_file = Path(earlier.get("out") or ".") / METRICS_FILE
    if "out" in earlier and steps.reusable(name, {**made_from, "out": earlier["out"]}, metrics_file):
        print(f"  (reusing {metrics_file.parent}, evaluated by an earlier run from the same models)")
        return json.loads(metrics_file.read_text())
    metrics = evaluate()
    steps.finished(name, {**made_from, "out": str(metrics["out"])})
    return metrics


def reported(steps: DemoSteps, experiment: Path, metrics_files: list[Path]) -> Path:
    from cxrdist.evaluation.report.report import run_report

    page = experiment / REPORT_DIR / REPORT_PAGE
    made_from = {"version": __version__, "inputs": [file_stamp(p) for p in metrics_files]}
    if steps.reusable("report", made_from, page):
        print(f"  (reusing {page}, written by an earlier run from the same evaluation)")
        return page
    page = run_report(experiment)
    steps.finished("report", made_from)
    return page


def run_demo(out: Path) -> int:
    from cxrdist.evaluation.prediction.ensemble import run_evaluate

    out = Path(out).resolve()
    synth, shards, runs = out / "synth", out / "shards", out / "runs"
    steps = DemoSteps(out)
    start = time.perf_counter()
    step(f"[1/5] synthesising {DEMO_IMAGES} radiographs in {synth}")
    made_from = {"n": DEMO_IMAGES, "size": DEMO_IMAGE_SIZE, "seed": 0}
    shards_ready = (shards / "manifest.json").is_file()
    if shards_ready or steps.reusable("synth", made_from, synth / "labels.csv"):
        print(f"  (reusing {shards}: made from them by an earlier run)" if shards_ready else f"  (reusing {synth}: drawn by an earlier run)")
    else:
        make_synthetic_dataset(synth, **made_from, workers=2)
        steps.finished("synth", made_from)
    step(f"[2/5] {DEMO_FOLDS} patient-grouped MIS folds + a test split, as shards in {shards}")
    if not shards_ready:
        prepare(PrepareOptions(source="csv", csv=synth / "labels.csv", images=synth / "images", out=shards, folds=DEMO_FOLDS,
                               test_fraction=0.2, max_size=DEMO_IMAGE_SIZE, samples_per_shard=250, workers=2,
                               attributes="sex,age"))  # the subgroup audit's attributes (the view is kept anyway)
    else:
        print(f"  (reusing {shards})")
    experiment = runs / "demo"
    train_folds(steps, experiment, [f"data.shards={shards}", f"output_dir={runs}"], load_manifest(shards).num_folds, "[3/5]",
                f"with {DEMO_PROCESSES} CPU processes")
    step("[4/5] fold ensemble x horizontal-flip TTA on the test split")
    metrics = evaluated(steps, "evaluate", experiment, lambda: run_evaluate(experiment, "test", True, None, 64, 2))
    step("[5/5] report")
    page = reported(steps, experiment, [Path(metrics["out"]) / METRICS_FILE])
    minutes = (time.perf_counter() - start) / 60
    print(f"\nensemble macro AUC on the synthetic test split: {metrics['ensemble']['macro_auc']:.4f}")
    print(f"report: {page}")
    print(f"demo finished in {minutes:.1f} min")
    return 0


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)
