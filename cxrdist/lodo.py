"""`cxrdist lodo`: leave-one-dataset-out validation of a config whose `data.shards` lists several datasets.

For each dataset NAME in turn: every fold is trained on all the other datasets (its own experiment,
EXPERIMENT-without-NAME, cxrdist/layout.py), that ensemble is evaluated on its training datasets' test split
(internal) and on NAME, which it never saw (external, as `cxrdist evaluate --external`: over the labels both share,
into external/NAME-ID-SPLIT, ID from NAME's manifest identity). Then one summary, OUTPUT_DIR/EXPERIMENT/lodo/lodo.json,
printed as a table: per left-out dataset the external and the internal macro AUC, and both over exactly the labels
scored in both (a label with one class in either evaluation is left out of both; the count shown is the count used).

Running it again resumes: a fold whose newest checkpoint finished `train.epochs` is not relaunched (an unfinished
one resumes from its checkpoint) when it was trained under the same run-defining settings (training/resume_settings.py)
on the same data; otherwise lodo stops with one line naming the fold and what changed (`train.resume_changes=allow`:
reused anyway, said). An evaluation whose metrics.json is newer than every fold model it scored and names the same
folds is read back, not redone; a left-out dataset prepared again has another identity, so another folder, and is
scored anew. `--evaluate-only` (slurm/lodo.sh's last job) trains nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cxrdist.atomic import atomic_write_json
from cxrdist.data.datasets import DatasetEntry, is_dataset_list, load_manifest, open_datasets, parse_entries
from cxrdist.data.manifest import load_one_manifest
from cxrdist.errors import UserError
from cxrdist.layout import (BEST_DIR, CARD_FILE, ENSEMBLE_DIR, EXTERNAL_DIR, METRICS_FILE, TEST_SPLIT, WEIGHTS_FILE, fold_best_dirs,
                            fold_name, held_out_experiment, lodo_summary_file, run_dir)
from cxrdist.text import count

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


def reuse_problem(directory: Path, cfg, training: tuple[DatasetEntry, ...]) -> str | None:
    """Why a finished fold cannot stand for a run under `cfg` (its run-defining settings or its training data differ), or None."""
    from cxrdist.model.card import ModelCard
    from cxrdist.training.checkpoint import STATE_FILE, list_checkpoints
    from cxrdist.training.config import to_dict
    from cxrdist.training.resume_settings import changed, describe, model_settings

    recorded = json.loads((list_checkpoints(directory)[-1] / STATE_FILE).read_text()).get("settings") or {}
    differences = changed(recorded, model_settings(to_dict(cfg)))
    if differences:
        return f"trained under other settings ({describe(differences)})"
    if ModelCard.read(directory / BEST_DIR).dataset != open_datasets(list(training), cfg.data.vocabulary)[1].identity():
        return "trained on other data (its training datasets prepared again, or their label_map or data.vocabulary changed)"
    return None


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
    output_dir = Path(cfg.output_dir).absolute()  # the summary names its files wherever it is read from
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
    from cxrdist.training.config import load_config
    from cxrdist.training.launcher.launch import experiment_info, launch_fold

    overrides = [*settings.overrides, *run.overrides()]
    folds = experiment_info(settings.config, overrides)[2]
    for fold in range(folds):
        where = f"{run.experiment}/{fold_name(fold)}"
        directory = run_dir(output_dir, run.experiment, fold)
        if fold_finished(directory, epochs):
            cfg = load_config(settings.config, overrides, fold)
            problem = reuse_problem(directory, cfg, run.training)
            if problem is None:
                say(f"lodo: {where} (without {run.held_out.name}): trained, {epochs} epoch(s), same settings and data; not relaunched")
                continue
            if cfg.train.resume_changes != "allow":
                raise UserError(f"{where} is finished but was {problem}; lodo would reuse it for this run: restore them, or give "
                                "another experiment name (experiment=NEW) to train anew (train.resume_changes=allow reuses it anyway)")
            say(f"lodo: {where}: reused although {problem} (train.resume_changes=allow); not relaunched")
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
    from cxrdist.evaluation.prediction.external import dataset_identity, result_folder

    experiment_dir = output_dir / run.experiment
    identity = dataset_identity(load_one_manifest(run.held_out.location), run.held_out.label_map)
    out = experiment_dir / EXTERNAL_DIR / result_folder(run.held_out.name, identity, settings.external_split)
    external = evaluation(settings, experiment_dir, out, settings.external_split, run.held_out, say)
    internal = None
    if TEST_SPLIT in load_manifest(list(run.training)).splits:
        internal = evaluation(settings, experiment_dir, experiment_dir / ENSEMBLE_DIR, TEST_SPLIT, None, say)
    return summary_row(run, experiment_dir, external, internal)


def evaluation(settings: Settings, experiment_dir: Path, out: Path, split: str, external, say) -> dict:
    from cxrdist.evaluation.prediction.ensemble import result_line, run_evaluate
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
    say(f"lodo: {result_line(metrics)}")
    return metrics


def scored_labels(metrics: dict) -> list[str]:
    return [label for label, auc in metrics["ensemble"]["per_label"].items() if auc is not None]


def mean_auc(per_label: dict, labels: list[str]) -> float | None:
    values = [per_label[label] for label in labels if per_label.get(label) is not None]
    return sum(values) / len(values) if values else None


def summary_row(run: HeldOutRun, experiment_dir: Path, external: dict, internal: dict | None) -> dict:
    """External and internal macro AUC (each over the labels it scored), and both over exactly the labels scored in both."""
    scored = scored_labels(external)
    row = {"experiment": str(experiment_dir), "trained_on": [entry.name for entry in run.training],
           "external": {"split": external["split"], "macro_auc": external["ensemble"]["macro_auc"], "labels": scored,
                        "num_samples": external["num_samples"], "metrics": str(Path(external["out"]) / METRICS_FILE),
                        "identity": (external.get("external_dataset") or {}).get("identity")},
           "internal": None, "compared": None}
    if internal is not None:
        row["internal"] = {"split": internal["split"], "macro_auc": internal["ensemble"]["macro_auc"], "labels": scored_labels(internal),
                           "num_samples": internal["num_samples"], "metrics": str(Path(internal["out"]) / METRICS_FILE)}
        both = [label for label in scored if label in row["internal"]["labels"]]
        row["compared"] = {"labels": both, "external_macro_auc": mean_auc(external["ensemble"]["per_label"], both),
                           "internal_macro_auc": mean_auc(internal["ensemble"]["per_label"], both)}
    return row


def summary_table(summary: dict) -> str:
    from cxrdist.evaluation.report.datasets import SUMMARY_HEADER, summary_cells

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    rows = [SUMMARY_HEADER] + [[name, *map(cell, summary_cells(row))] for name, row in summary["held_out"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(SUMMARY_HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]
    return (f"leave-one-dataset-out, {summary['experiment']} (external: {summary['external_split']}, internal: the training datasets' "
            f"{summary['internal_split']} split; compared: both averaged over the labels scored in both, "
            f"{count(len(summary['held_out']), 'left-out dataset')})\n" + "\n".join(lines))
