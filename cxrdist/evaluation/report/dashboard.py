"""W&B runs for what happens after training, in the experiment's group next to the fold runs:
`cxrdist evaluate` -> an `ensemble` run (AUC table with intervals, per-dataset macro AUCs, ROC curves per
label, fold agreement, TTA and ensemble gains; `external-<dataset>` for `--external`); `cxrdist report` -> a `report` run holding the HTML page as an
artifact. Mode and project come from the folds' config.yaml (logging.wandb / logging.project, with
WANDB_MODE winning), so evaluation lands where training did; nothing is logged when it is disabled.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from cxrdist.evaluation.scoring.outputs import load_fold_probabilities
from cxrdist.evaluation.scoring.subgroups import wandb_values
from cxrdist.layout import CONFIG_FILE, FOLD_PROBABILITIES_FILE, PREDICTIONS_FILE, fold_run_dirs
from cxrdist.wandb_settings import artifact_safe, wandb_mode

ROC_POINTS = 101  # per label, on a fixed FPR grid: small tables, curves comparable across runs


def tracking_settings(runs: Path) -> dict:
    """{"mode", "project", "group"} from the first fold's config.yaml (defaults when there is none)."""
    from omegaconf import OmegaConf

    configs = [d / CONFIG_FILE for d in fold_run_dirs(runs) if (d / CONFIG_FILE).is_file()]
    cfg = OmegaConf.to_container(OmegaConf.load(configs[0])) if configs else {}
    logging = cfg.get("logging", {})
    return {"mode": wandb_mode(str(logging.get("wandb", "auto"))), "project": logging.get("project", "cxrdist"),
            "group": cfg.get("experiment", Path(runs).name)}


def start_run(runs: Path, name: str, job_type: str, directory: Path, config: dict):
    """A W&B run in the experiment's group, or None when W&B is disabled."""
    settings = tracking_settings(runs)
    if settings["mode"] == "disabled":
        return None
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=settings["project"], group=settings["group"], name=name, job_type=job_type, dir=str(directory),
                      mode=settings["mode"], config=config, reinit="create_new")


def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def auc_table(metrics: dict):
    """One row per label: ensemble AUC, its interval, and every fold model's AUC."""
    import wandb

    models = list(metrics.get("models", {}))
    intervals = metrics["ensemble"].get("interval", {}).get("per_label", {})
    table = wandb.Table(columns=["label", "auc", "low", "high", *[f"auc_{m}" for m in models]])
    for label in metrics["labels"]:
        low, high = intervals.get(label) or (None, None)
        folds = [number(metrics["models"][m]["per_label"].get(label)) for m in models]
        table.add_data(label, number(metrics["ensemble"]["per_label"].get(label)), number(low), number(high), *folds)
    return table


def roc_table(predictions: Path, labels: list[str]):
    """(label, fpr, tpr) rows for every label with both classes among its evaluated samples."""
    import wandb

    frame = pd.read_csv(predictions)
    grid = np.linspace(0.0, 1.0, ROC_POINTS)
    table = wandb.Table(columns=["label", "fpr", "tpr"])
    for label in labels:
        rows = frame[f"target_{label}"].notna()
        targets, scores = frame.loc[rows, f"target_{label}"].to_numpy(), frame.loc[rows, f"prob_{label}"].to_numpy()
        if len(np.unique(targets)) < 2:
            continue
        fpr, tpr, _ = roc_curve(targets, scores)
        for x, y in zip(grid, np.interp(grid, fpr, tpr)):
            table.add_data(label, float(x), float(y))
    return table


def agreement_table(fold_probabilities: Path):
    """Mean per-label Spearman correlation between every two fold models (as in the HTML report)."""
    import wandb

    from cxrdist.evaluation.report.report import fold_agreement

    data = load_fold_probabilities(fold_probabilities)
    names = [str(n) for n in data["models"]]
    agreement = fold_agreement(data["probabilities"])
    table = wandb.Table(columns=["model", *names])
    for name, row in zip(names, agreement):
        table.add_data(name, *[number(v) for v in row])
    off = agreement[~np.eye(len(names), dtype=bool)]
    return table, (float(np.nanmean(off)) if off.size else None)


def flat_summary(metrics: dict) -> dict:
    summary = {"ensemble/macro_auc": number(metrics["ensemble"]["macro_auc"])}
    low_high = metrics["ensemble"].get("interval", {}).get("macro_auc") or [None, None]
    summary.update({"ensemble/macro_auc_low": number(low_high[0]), "ensemble/macro_auc_high": number(low_high[1])})
    summary.update({f"ensemble/auc/{label}": number(v) for label, v in metrics["ensemble"]["per_label"].items()})
    summary.update({f"models/{name}/macro_auc": number(m["macro_auc"]) for name, m in metrics.get("models", {}).items()})
    gains = metrics.get("gains", {})
    summary.update({f"gains/{k}": number(v) for k, v in gains.items() if not isinstance(v, dict)})
    summary.update({f"gains/tta/{name}": number(v) for name, v in (gains.get("tta_per_model") or {}).items()})
    if "ensemble_no_tta" in metrics:
        summary["ensemble/macro_auc_no_tta"] = number(metrics["ensemble_no_tta"]["macro_auc"])
    for name, entry in metrics.get("per_dataset", {}).items():  # as training logs val/dataset_auc/<dataset>
        summary[f"ensemble/dataset_auc/{name}"] = number(entry["macro_auc"])
        summary[f"ensemble/dataset_labels/{name}"] = entry["labels"]
    summary.update(wandb_values(metrics.get("subgroups", {}), "ensemble"))  # ensemble/subgroup_auc/<attribute>/<group>, escaped
    return {k: v for k, v in summary.items() if v is not None}


def per_dataset_table(metrics: dict):
    """One row per dataset and one "pooled": macro AUC over the labels it annotates, labels scored, images."""
    import wandb

    table = wandb.Table(columns=["dataset", "macro_auc", "labels", "annotated", "evaluated"])
    for name, entry in metrics.get("per_dataset", {}).items():
        table.add_data(name, number(entry["macro_auc"]), entry["labels"], entry["annotated"], entry["evaluated"])
    return table


def evaluation_run_name(metrics: dict) -> str:
    """`ensemble`, or `external-<dataset>` for `cxrdist evaluate --external` (its own run, next to the internal one)."""
    if not metrics.get("external"):
        return "ensemble"
    return "external-" + next((name for name in metrics.get("per_dataset", {}) if name != "pooled"), "dataset")


def log_ensemble_run(runs: Path, metrics: dict, out: Path) -> None:
    """The `ensemble` (or `external-<dataset>`) run of `cxrdist evaluate`: reads what evaluate wrote to `out`."""
    config = {k: metrics.get(k) for k in ("split", "tta", "num_samples", "num_patients", "model_names", "shards", "world_size", "external")}
    run = start_run(runs, evaluation_run_name(metrics), "evaluate", Path(out), config)
    if run is None:
        return
    import wandb

    try:
        values = flat_summary(metrics)
        values["ensemble/per_label_auc"] = auc_table(metrics)
        if metrics.get("per_dataset"):
            values["ensemble/per_dataset_auc"] = per_dataset_table(metrics)
        roc = roc_table(Path(out) / PREDICTIONS_FILE, metrics["labels"])
        values["ensemble/roc"] = wandb.plot.line(roc, "fpr", "tpr", stroke="label", title=f"ROC per label ({metrics['split']})")
        probabilities = Path(out) / FOLD_PROBABILITIES_FILE
        if probabilities.is_file() and len(metrics.get("model_names", [])) > 1:
            values["ensemble/fold_agreement"], mean_agreement = agreement_table(probabilities)
            if mean_agreement is not None and math.isfinite(mean_agreement):
                values["ensemble/fold_agreement_mean"] = mean_agreement
        run.log(values)
    finally:
        run.finish()


def log_report_artifact(runs: Path, page: Path) -> None:
    """The `report` run of `cxrdist report`: the HTML page and its figures as one artifact."""
    run = start_run(runs, "report", "report", page.parent, {"report": page.name})
    if run is None:
        return
    import wandb

    try:
        artifact = wandb.Artifact(f"{artifact_safe(run.group or 'cxrdist')}-report", type="report", metadata={"page": page.name})
        for path in sorted(p for p in page.parent.rglob("*") if p.is_file() and "wandb" not in p.relative_to(page.parent).parts):
            artifact.add_file(str(path), name=path.relative_to(page.parent).as_posix())
        run.log_artifact(artifact)
        run.log({"report": wandb.Html(page.read_text())})
    finally:
        run.finish()

