"""`cxrdist lodo`: leave-one-dataset-out validation of a config whose `data.shards` lists several datasets.

For each dataset NAME in turn: every fold is trained on all the other datasets (its own experiment,
EXPERIMENT-without-NAME, cxrdist/layout.py), that ensemble is evaluated on its training datasets' test split
(internal) and on NAME, which it never saw (external, as `cxrdist evaluate --external`: over the labels both share).
Then one summary, OUTPUT_DIR/EXPERIMENT/lodo/lodo.json, printed as a table: per left-out dataset the external macro
AUC, the internal one, and the internal one over the same labels the external one scored.

Running it again resumes: a fold whose newest checkpoint finished `train.epochs` is not relaunched (an unfinished
one resumes from its checkpoint), and an evaluation whose metrics.json is newer than every fold model it scored and
names the same folds is read back, not redone. `--evaluate-only` (slurm/lodo.sh's last job) trains nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cxrdist.atomic import atomic_write_json
from cxrdist.data.datasets import DatasetEntry, is_dataset_list, load_manifest, parse_entries
from cxrdist.errors import UserError
from cxrdist.layout import (BEST_DIR, CARD_FILE, ENSEMBLE_DIR, EXTERNAL_DIR, METRICS_FILE, TEST_SPLIT, WEIGHTS_FILE, fold_best_dirs,
                            fold_name, held_out_experiment, lodo_summary_file, run_dir)

EXTERNAL_SPLITS = ("all", TEST_SPLIT)


@dataclass(frozen=True)
class HeldOutRun:
    """One leave-one-dataset-out experiment: trained on `training`, validated externally on `held_out`."""

    held_out: DatasetEntry
    training: tuple[DatasetEntry, ...]
    experiment: str

    def shards_override(self) -> str:
        return "data.shards=" + json.dumps([entry.to_dict() for entry in self.training])

    def overrides(self) -> list[str]:
        return [self.shards_override(), f"experiment={self.experiment}"]


def plan(shards, experiment: str) -> list[HeldOutRun]:
    """One HeldOutRun per dataset of `data.shards`; fewer than two datasets is a UserError, and so is anything training on
    all of them would refuse (checked before any training: a fold count or vocabulary that does not agree)."""
    entries = parse_entries(shards) if is_dataset_list(shards) else ()
    if len(entries) < 2:
        named = ", ".join(entry.name for entry in entries) or str(shards)
        raise UserError(f"data.shards names {len(entries) or 1} dataset ({named}); leaving one dataset out needs a list of at least 2")
    load_manifest(entries)
    return [HeldOutRun(entry, tuple(other for other in entries if other is not entry), held_out_experiment(experiment, entry.name))
            for entry in entries]


def fold_finished(directory: Path, epochs: int) -> bool:
    """The fold's newest complete checkpoint has trained `epochs` epochs and its best model is written."""
    from cxrdist.training.checkpoint import STATE_FILE, list_checkpoints

    checkpoints = list_checkpoints(directory)
    if not checkpoints or not (directory / BEST_DIR / CARD_FILE).is_file():
        return False
    return json.loads((checkpoints[-1] / STATE_FILE).read_text()).get("epoch", 0) >= epochs


def previous_evaluation(experiment_dir: Path, out: Path, split: str) -> dict | None:
    """The metrics.json in `out` when it scored `split` with exactly the fold models there are now, written after all of them."""
    path = out / METRICS_FILE
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    best = fold_best_dirs(experiment_dir)
    newest_model = max(((d / WEIGHTS_FILE).stat().st_mtime for d in best), default=math.inf)
    if metrics.get("split") != split or metrics.get("model_names") != [d.parent.name for d in best] or path.stat().st_mtime < newest_model:
        return None
    return metrics


@dataclass
class Settings:
    config: Path
    overrides: list
    processes: int | None = None
    launch_config: Path | None = None
    external_split: str = "all"
    resamples: int = 1000
    batch_size: int = 64
    workers: int = 2
    evaluate_only: bool = False


def run_lodo(settings: Settings, say=print) -> dict:
    """Train, evaluate and summarise every held-out run; returns the summary (also written to lodo.json)."""
    from cxrdist.training.config import load_config

    if settings.external_split not in EXTERNAL_SPLITS:
        raise UserError(f"--external-split {settings.external_split!r}: expected one of {', '.join(EXTERNAL_SPLITS)}")
    cfg = load_config(settings.config, settings.overrides)
    runs = plan(cfg.data.shards, cfg.experiment)
    output_dir = Path(cfg.output_dir)
    for run in runs:
        train_held_out(settings, run, cfg.train.epochs, output_dir, say)
    rows = {run.held_out.name: evaluate_held_out(settings, run, output_dir, say) for run in runs}
    summary = {"experiment": cfg.experiment, "output_dir": str(output_dir), "external_split": settings.external_split,
               "internal_split": TEST_SPLIT, "held_out": rows}
    path = lodo_summary_file(output_dir, cfg.experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, summary)
    say(summary_table(summary))
    say(f"wrote {path}")
    return summary


def train_held_out(settings: Settings, run: HeldOutRun, epochs: int, output_dir: Path, say) -> None:
    from cxrdist.training.launcher.launch import experiment_info, launch_fold

    overrides = [*settings.overrides, *run.overrides()]
    folds = experiment_info(settings.config, overrides)[2]
    for fold in range(folds):
        where = f"{run.experiment}/{fold_name(fold)}"
        if fold_finished(run_dir(output_dir, run.experiment, fold), epochs):
            say(f"lodo: {where} (without {run.held_out.name}): trained, {epochs} epoch(s); not relaunched")
            continue
        if settings.evaluate_only:
            raise UserError(f"{where} is not trained to {epochs} epoch(s) yet; run `cxrdist lodo` without --evaluate-only to train it")
        say(f"lodo: training {where} on {', '.join(entry.name for entry in run.training)} (left out: {run.held_out.name})")
        code = launch_fold(settings.config, fold, overrides, settings.processes, settings.launch_config)
        if code != 0:
            raise TrainingStopped(code, where)


class TrainingStopped(Exception):
    """A fold's trainer ended without finishing (its exit code: 75 after a preemption, else a failure it explained)."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"{where} stopped with exit code {code}")
        self.code, self.where = code, where


def evaluate_held_out(settings: Settings, run: HeldOutRun, output_dir: Path, say) -> dict:
    """The internal (test split of the training datasets, when they have one) and external evaluations of one held-out run."""
    experiment_dir = output_dir / run.experiment
    external = evaluation(settings, experiment_dir, experiment_dir / EXTERNAL_DIR / run.held_out.name, settings.external_split,
                          run.held_out, say)
    internal = None
    if TEST_SPLIT in load_manifest(list(run.training)).splits:
        internal = evaluation(settings, experiment_dir, experiment_dir / ENSEMBLE_DIR, TEST_SPLIT, None, say)
    return summary_row(run, experiment_dir, external, internal)


def evaluation(settings: Settings, experiment_dir: Path, out: Path, split: str, external, say) -> dict:
    from cxrdist.evaluation.prediction.ensemble import run_evaluate
    from cxrdist.evaluation.report.dashboard import log_ensemble_run

    what = f"{experiment_dir.name}: {'external ' + external.name if external is not None else 'internal'} ({split})"
    metrics = previous_evaluation(experiment_dir, out, split)
    if metrics is not None:
        say(f"lodo: {what}: evaluated already ({out / METRICS_FILE}); not redone")
        return metrics
    say(f"lodo: evaluating {what}")
    metrics = run_evaluate(experiment_dir, split, True, out, settings.batch_size, settings.workers, resamples=settings.resamples,
                           external=external)
    log_ensemble_run(experiment_dir, metrics, out)
    return metrics


def scored_labels(metrics: dict) -> list[str]:
    return [label for label, auc in metrics["ensemble"]["per_label"].items() if auc is not None]


def mean_auc(per_label: dict, labels: list[str]) -> float | None:
    values = [per_label[label] for label in labels if per_label.get(label) is not None]
    return sum(values) / len(values) if values else None


def summary_row(run: HeldOutRun, experiment_dir: Path, external: dict, internal: dict | None) -> dict:
    """External macro AUC over the labels both share, internal macro AUC (all labels, and those the external one scored)."""
    shared = scored_labels(external)
    row = {"experiment": str(experiment_dir), "trained_on": [entry.name for entry in run.training],
           "external": {"split": external["split"], "macro_auc": external["ensemble"]["macro_auc"], "labels": shared,
                        "num_samples": external["num_samples"], "metrics": str(Path(external["out"]) / METRICS_FILE)},
           "internal": None}
    if internal is not None:
        row["internal"] = {"split": internal["split"], "macro_auc": internal["ensemble"]["macro_auc"],
                           "macro_auc_shared_labels": mean_auc(internal["ensemble"]["per_label"], shared),
                           "num_samples": internal["num_samples"], "metrics": str(Path(internal["out"]) / METRICS_FILE)}
    return row


def summary_table(summary: dict) -> str:
    def auc(value) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"

    header = ["left out", "trained on", "external AUC", "labels", "internal AUC", "internal, same labels"]
    rows = [header]
    for name, row in summary["held_out"].items():
        internal = row["internal"] or {}
        rows.append([name, ", ".join(row["trained_on"]), auc(row["external"]["macro_auc"]), str(len(row["external"]["labels"])),
                     auc(internal.get("macro_auc")), auc(internal.get("macro_auc_shared_labels"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]
    return (f"leave-one-dataset-out, {summary['experiment']} (external: {summary['external_split']}, "
            f"internal: the training datasets' {summary['internal_split']} split)\n" + "\n".join(lines))
