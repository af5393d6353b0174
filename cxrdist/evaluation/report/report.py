"""`cxrdist report`: one HTML page about an experiment, with its PNG figures in figures/ next to it.

It reads what the other stages left behind and shows what is there: the manifest (label frequency,
fold balance, sample images from the shards), every fold's metrics.jsonl (training curves) and best
model (validation AUC, the learned coupling matrix), and, when `cxrdist evaluate` has run, the
ensemble's metrics.json, predictions.csv and fold_probabilities.npz (AUC table with intervals, ROC
curves, label correlation, fold agreement). The page needs no network to be viewed.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open
from scipy.stats import rankdata

from cxrdist.data.ingest.images import decode_image
from cxrdist.data.location import Location
from cxrdist.data.datasets import load_recorded, recorded_root
from cxrdist.data.manifest import Manifest, has_manifest
from cxrdist.data.datasets import load_manifest
from cxrdist.data.stream import read_shards
from cxrdist.errors import UserError, one_line
from cxrdist.atomic import atomic_write_text, check_writable_dir
from cxrdist.evaluation import figures as figs
from cxrdist.evaluation.prediction.coverage import say_coverage, say_stale_ensemble
from cxrdist.evaluation.report.audit import audit_section
from cxrdist.evaluation.report.clinical import clinical_section, evaluated_counts, few_cases_note
from cxrdist.evaluation.report.datasets import datasets_section
from cxrdist.evaluation.report.html import auc_cell, card, esc, few_flag, figure, fmt, note, page, percent, section, signed, table
from cxrdist.evaluation.report.saliency_grid import saliency_section
from cxrdist.evaluation.scoring.bootstrap import FEW_CASES
from cxrdist.evaluation.scoring.outputs import load_fold_probabilities
from cxrdist.layout import (
    BEST_DIR, CARD_FILE, COMPARE_DIR, COMPARE_FILE, ENSEMBLE_DIR, FOLD_PROBABILITIES_FILE, METRICS_FILE, METRICS_LOG, PREDICTIONS_FILE, REPORT_DIR,
    TEST_SPLIT, WEIGHTS_FILE,
    fold_run_dirs,
)
from cxrdist.model.card import ModelCard
from cxrdist.model.inert import COUPLING_KEY, inert_message, max_logit_shift
from cxrdist.model.refine import LabelGraphRefinement

PAGE_FILE = "report.html"
FIGURES = "figures"
SAMPLE_IMAGES = 12
TOP_COUPLINGS = 10


# ---------------------------------------------------------------- what the runs left behind


@dataclass
class FoldRun:
    name: str
    directory: Path
    card: ModelCard | None = None  # best/model.json
    train: list[dict] = field(default_factory=list)  # metrics.jsonl "train" records
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl "eval" records
    coupling: np.ndarray | None = None  # the best model's A


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl lines; a half-written last line (a run still going) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_coupling(weights: Path, card: ModelCard | None) -> np.ndarray | None:
    """The exported A; a weights file that is not what its card describes is one line, not a missing figure."""
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            coupling = handle.get_tensor(COUPLING_KEY).float().numpy() if COUPLING_KEY in handle.keys() else None
    except Exception as err:  # noqa: BLE001 -- truncated or not a safetensors file
        raise UserError(f"{weights}: not a readable model weights file ({type(err).__name__}: {one_line(err)})") from None
    if card is not None and card.model.refine.enabled and coupling is None:
        raise UserError(f"{weights}: does not hold the weights {CARD_FILE} describes (no {COUPLING_KEY})")
    return coupling


def find_fold_runs(runs: Path) -> list[FoldRun]:
    runs = Path(runs)
    if not runs.is_dir():
        raise UserError(f"{runs}: no such runs directory")
    folds = []
    for directory in fold_run_dirs(runs):
        best = directory / BEST_DIR
        card = ModelCard.read(best) if (best / CARD_FILE).is_file() else None
        records = read_records(directory / METRICS_LOG)
        folds.append(FoldRun(
            directory.name, directory, card,
            [r for r in records if r.get("kind") == "train"], [r for r in records if r.get("kind") == "eval"],
            read_coupling(best / WEIGHTS_FILE, card),
        ))
    if not folds:
        raise UserError(f"{runs}: no fold-K run directories (expected runs/EXPERIMENT/fold-0, ...)")
    return folds


def find_manifest(folds: list[FoldRun], shards: Location | None) -> tuple[Location | None, Manifest | None]:
    candidates = [shards] if shards is not None else [f.card.shards for f in folds if f.card]
    labels = next((f.card.labels for f in folds if f.card), None)
    for root in map(recorded_root, candidates):
        if isinstance(root, tuple) or has_manifest(root):  # a tuple: several datasets (data/datasets.py), in the models' vocabulary
            return root, load_recorded(root, labels) if labels else load_manifest(root)
    return None, None


@dataclass
class EnsembleResults:
    metrics: dict
    predictions: pd.DataFrame | None
    fold_probabilities: dict | None


def load_ensemble(directory: Path) -> EnsembleResults | None:
    if not (directory / METRICS_FILE).is_file():
        return None
    metrics = json.loads((directory / METRICS_FILE).read_text())
    predictions = pd.read_csv(directory / PREDICTIONS_FILE) if (directory / PREDICTIONS_FILE).is_file() else None
    folds = load_fold_probabilities(directory / FOLD_PROBABILITIES_FILE) if (directory / FOLD_PROBABILITIES_FILE).is_file() else None
    return EnsembleResults(metrics, predictions, folds)


# ---------------------------------------------------------------- pure summaries


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def label_correlation(probs: np.ndarray) -> np.ndarray:
    """C x C Spearman correlation between the labels' predicted probabilities."""
    c = probs.shape[1]
    return np.array([[rank_correlation(probs[:, i], probs[:, j]) for j in range(c)] for i in range(c)])


def fold_agreement(probs: np.ndarray) -> np.ndarray:
    """F x F: mean over labels of the Spearman correlation between two models' probabilities."""
    f, _, c = probs.shape
    out = np.ones((f, f))
    for a in range(f):
        for b in range(a + 1, f):
            values = [rank_correlation(probs[a, :, j], probs[b, :, j]) for j in range(c)]
            finite = [v for v in values if math.isfinite(v)]
            out[a, b] = out[b, a] = float(np.mean(finite)) if finite else float("nan")
    return out


def coupling_summary(matrix: np.ndarray, labels: list[str], k: int = TOP_COUPLINGS) -> tuple[float, list[tuple[str, str, float]]]:
    """(sparsity, top couplings) computed by the refinement module itself, so the report says what training logs."""
    import torch

    module = LabelGraphRefinement(len(labels))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(matrix))
    return module.sparsity(), module.top_couplings(labels, k)


def training_series(fold: FoldRun) -> dict[str, list]:
    ema = [r for r in fold.evals if isinstance(r.get("ema"), dict)]
    return {
        "step": [r["step"] for r in fold.train if r.get("loss") is not None],
        "loss": [r["loss"] for r in fold.train if r.get("loss") is not None],
        "lr": [r.get("lr") for r in fold.train if r.get("loss") is not None],
        "eval_step": [r["step"] for r in ema],
        "ema_auc": [_nan(r["ema"].get("macro_auc")) for r in ema],
        "live_auc": [_nan((r.get("live") or {}).get("macro_auc")) for r in ema],
    }


def refinement_phrase(folds: list[FoldRun]) -> str:
    """Whether the label-graph refinement did anything, from the folds' best models' A (model/inert.py's rule)."""
    trained = [f for f in folds if f.card]
    if not any(f.card.model.refine.enabled for f in trained):
        return "label-graph refinement off"
    with_a = [f for f in trained if f.card.model.refine.enabled and f.coupling is not None]
    inert = [f for f in with_a if inert_message(f.coupling, float(f.card.model.refine.alpha), float(f.card.model.refine.l1))]
    if not inert:
        return "label-graph refinement on" + (" and active in every fold" if with_a else "")
    exact = all(max_logit_shift(f.coupling, 1.0) == 0 for f in inert)
    state = "exactly zero" if exact else "(nearly) zero"
    if len(inert) == len(with_a):
        return f"label-graph refinement on but inert: A is {state} in every fold, so the models are the plain backbone"
    return f"label-graph refinement on; inert (A {state}) in {', '.join(f.name for f in inert)}"


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------- sections


def overview(runs: Path, folds: list[FoldRun], manifest: Manifest | None, ensemble: EnsembleResults | None) -> tuple[list[str], str]:
    cards_ = [f for f in folds if f.card]
    first = cards_[0].card if cards_ else None
    lines = []
    if first is not None:
        lines.append(f"{esc(first.model.backbone)} at {esc(first.image.size)} px · {esc(refinement_phrase(folds))} · {first.num_labels} labels")
    lines.append(f"runs: <code>{esc(runs)}</code>")
    cards = []
    if ensemble is not None:
        m = ensemble.metrics
        ens = m["ensemble"]
        ci = (ens.get("interval") or {}).get("macro_auc")
        sub = f"95% CI {ci[0]:.3f}–{ci[1]:.3f} · {esc(m['split'])}, {m['num_samples']} images" if ci else esc(m["split"])
        where = "Test" if m["split"] == TEST_SPLIT else esc(m["split"])
        cards.append(card(f"{where} macro AUC (ensemble{' + TTA' if m.get('tta') else ''})", fmt(ens.get("macro_auc")), sub))
        gain = (m.get("gains") or {}).get("ensemble_over_mean_model")
        cards.append(card("Gain over mean fold model", signed(gain), f"{len(m['model_names'])} models"))
    else:
        cards.append(card("Ensemble", "not evaluated", "run <code>cxrdist evaluate</code>"))
    cv = [f.card.metrics["ema"].get("macro_auc") for f in cards_ if f.card.metrics.get("ema")]
    cv = [v for v in cv if v is not None and math.isfinite(v)]
    if cv:
        cards.append(card("Held-out fold macro AUC, selected on that fold", fmt(float(np.mean(cv))),
                          f"mean of {len(cv)} folds; each is the best of its evaluations on the fold it is scored on (optimistic)"))
    cards.append(card("Folds trained", f"{len(cards_)} / {len(folds)}", "with a best model"))
    if manifest is not None:
        train_n = manifest.num_samples(manifest.fold_names)
        test_n = manifest.splits[TEST_SPLIT].num_samples if TEST_SPLIT in manifest.splits else 0
        cards.append(card("Images", f"{train_n + test_n:,}", f"{train_n:,} in folds · {test_n:,} test"))
    return lines, "".join(cards)


def data_section(root: Location | None, manifest: Manifest | None, fig_dir: Path, patient_ids: bool = True) -> str:
    if manifest is None:
        return section("data", "Data", "",
                       note("The shard directory recorded in the model cards is not available, so the label frequency, fold balance "
                            "and sample images cannot be shown."))
    members = getattr(manifest, "members", None) or {"": manifest}  # several datasets: each its own frequencies and folds
    body = "".join(dataset_data(name, member, fig_dir) for name, member in members.items())
    grid = sample_images(root, manifest, fig_dir / "samples.png", patient_ids)
    if grid:
        body += "<h3>Sample images</h3>" + grid
    return section("data", "Data", "The prepared shards: how often each finding occurs, how evenly the patient-grouped "
                   "multilabel-stratified folds split it, and what the stored images look like.", body)


def dataset_data(name: str, manifest: Manifest, fig_dir: Path) -> str:
    """Label frequency and fold balance of one prepared dataset (`name`: one of several, or "" for the only one)."""
    labels = manifest.labels
    folds = [manifest.splits[fold] for fold in manifest.fold_names]
    pos = np.array([sum(s.positives.get(l, 0) for s in folds) for l in labels], dtype=float)
    unc = np.array([sum(s.uncertain.get(l, 0) for s in folds) for l in labels], dtype=float)
    n = sum(s.num_samples for s in folds)
    test = manifest.splits.get(TEST_SPLIT)
    test_prev = np.array([test.positives.get(l, 0) / max(test.num_samples, 1) for l in labels]) if test else None
    figure_name = f"label_frequency{'-' + figure_safe(name) if name else ''}.png"
    figs.label_frequency(fig_dir / figure_name, labels, pos, unc, n, test_prev)
    of = f", dataset {esc(name)}" if name else ""
    return (f"<h3>Label frequency{of}</h3>" + figure(fig_dir / figure_name, "label frequency",
            f"Share of the {n:,} training-fold images with each finding positive (dark) or uncertain (light); dots: the test split.")
            + f"<h3>Fold balance{of}</h3>" + balance_table(manifest))


def figure_safe(name: str) -> str:
    """A dataset name as part of a file name: letters, digits, - and _ kept, the rest as their code points."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else f"_{ord(c):x}" for c in name)


def balance_table(manifest: Manifest) -> str:
    names = list(manifest.splits)
    balance = manifest.balance or {}
    deviation = balance.get("max_deviation", {})
    header = ["", *names, "max fold dev. (pp)"]
    rows = [
        ["images", *[f"{manifest.splits[s].num_samples:,}" for s in names], ""],
        ["patients", *[f"{manifest.splits[s].num_patients:,}" for s in names], ""],
    ]
    for label in manifest.labels:
        prev = [manifest.splits[s].prevalence.get(label) for s in names]
        dev = deviation.get(label)
        rows.append([esc(label), *[percent(p) for p in prev], "" if dev is None else f"{100 * dev:.2f}"])
    explain = "Prevalence of each finding per split (positives / images)."
    if balance:
        explain += (f" Largest fold deviation from the overall prevalence: {100 * balance.get('max_deviation_overall', 0):.2f} pp; "
                    f"fold size spread {100 * balance.get('size_spread', 0):.1f}%; "
                    f"patients in more than one split: {balance.get('patients_in_several_splits', 0)}.")
    return f'<p class="explain">{explain}</p>' + table(header, rows)


def sample_images(root: Location, manifest: Manifest, path: Path, patient_ids: bool = True) -> str:
    split = TEST_SPLIT if TEST_SPLIT in manifest.splits else manifest.fold_names[0]
    images, captions, titles = [], [], []
    for shard in manifest.split(split).shards:
        for sample in read_shards(root, [shard]):  # a shard of one of several datasets reads itself (data/datasets.py)
            data, meta = sample.image, json.loads(sample.meta)
            images.append(decode_image(data))
            raw = meta.get("labels", [])
            found = [l for l, v in zip(manifest.labels, raw) if v == 1] + [f"{l}?" for l, v in zip(manifest.labels, raw) if v == -1]
            captions.append(", ".join(found) or "no finding marked")
            titles.append(f"{meta.get('patient', '') if patient_ids else ''} · {meta.get('view', '')}".strip(" ·"))
            if len(images) == SAMPLE_IMAGES:
                break
        if len(images) == SAMPLE_IMAGES:
            break
    if not images:
        return ""
    figs.sample_grid(path, images, captions, titles)
    return figure(path, "sample images",
                  f"The first {len(images)} stored images of the {esc(split)} split as the models see them before resizing "
                  f"({esc(manifest.image.get('format', '?'))}, long side ≤ {esc(manifest.image.get('max_size', '?'))} px), "
                  "with their positive findings; "
                  "a question mark means uncertain.")


def auc_section(folds: list[FoldRun], ensemble: EnsembleResults | None, fig_dir: Path) -> str:
    if ensemble is None:
        return section("auc", "Discrimination", "", note("<code>cxrdist evaluate</code> has not been run for this experiment (no "
                       f"{ENSEMBLE_DIR}/{METRICS_FILE}), so there is no ensemble AUC, ROC curve or interval yet. Shown instead: each fold model's "
                       "validation AUC on its own held-out fold, as recorded when it was exported.") + cv_table(folds))
    m = ensemble.metrics
    labels, names = m["labels"], m["model_names"]
    ens, interval = m["ensemble"], (m["ensemble"].get("interval") or {})
    tta = m.get("tta")
    header = ["Label", *names] + (["ensemble, no TTA"] if tta else []) + [f"ensemble{' + TTA' if tta else ''} (95% CI)"]

    counts = evaluated_counts(ensemble.predictions, labels)

    def row(getter_models, value_ens_plain, value_ens, ci, flag=""):
        return [*getter_models, *([auc_cell(value_ens_plain)] if tta else []), auc_cell(value_ens, ci, flag)]

    rows = [["Macro AUC", *row([auc_cell(m["models"][n]["macro_auc"]) for n in names],
                                m.get("ensemble_no_tta", {}).get("macro_auc"), ens["macro_auc"], interval.get("macro_auc"))]]
    for label in labels:
        rows.append([esc(label), *row([auc_cell(m["models"][n]["per_label"].get(label)) for n in names],
                                       m.get("ensemble_no_tta", {}).get("per_label", {}).get(label), ens["per_label"].get(label),
                                       (interval.get("per_label") or {}).get(label),
                                       few_flag(min(counts[label]) if label in counts else None, FEW_CASES, "positives or negatives"))])
    gains = m.get("gains") or {}
    gain_rows = [["Ensemble over the mean fold model", signed(gains.get("ensemble_over_mean_model"))],
                 ["Ensemble over the best fold model", signed(gains.get("ensemble_over_best_model"))]]
    if tta:
        gain_rows += [["Flip TTA, ensemble", signed(gains.get("tta_ensemble"))],
                      ["Flip TTA, mean over fold models", signed(gains.get("tta_mean_model"))]]
    body = table(header, rows, ["macro"] + [""] * len(labels)) + few_cases_note(counts, labels, negatives=True)
    body += "<h3>Gains in macro AUC</h3>" + table(["", "Δ macro AUC"], gain_rows)
    notes = list(m.get("notes") or [])
    if m.get("skipped"):
        notes.append(f"Skipped (only one class among the evaluated images, so no AUC and not in the macro average): {', '.join(m['skipped'])}.")
    if m.get("corrupt"):
        notes.append(f"{m['corrupt']} images could not be decoded and were left out.")
    body += "".join(note(esc(n)) for n in notes)
    if ensemble.predictions is not None:
        body += "<h3>ROC curves (ensemble)</h3>" + roc_figure(ensemble.predictions, labels, ens["per_label"], fig_dir)
    bi = interval
    explain = (f"ROC-AUC on the <b>{esc(m['split'])}</b> split ({m['num_samples']:,} images, {m['num_patients']:,} patients) per fold model "
               f"{'with horizontal-flip TTA ' if tta else ''}and for the ensemble (mean of the models' probabilities). "
               f"Targets: {esc(targets_phrase(m.get('eval_targets')))}, whatever the training policy. "
               f"Intervals: 95% percentile bootstrap over {bi.get('resamples', '?')} resamples of patients (all images of a drawn patient).")
    return section("auc", "Discrimination", explain, body)


def targets_phrase(rule: str | None) -> str:
    """How the report describes the evaluation targets (cxrdist/labels/eval_targets.py)."""
    return {
        "zeros": "uncertain entries scored as negatives (eval targets 'zeros')",
        "ones": "uncertain entries scored as positives (eval targets 'ones')",
    }.get(rule or "", "uncertain entries left out of that label's AUC, blank = negative (eval targets 'ignore_uncertain')")


def cv_table(folds: list[FoldRun]) -> str:
    trained = [f for f in folds if f.card and f.card.metrics.get("ema")]
    if not trained:
        return note("No fold has exported a best model yet.")
    labels = trained[0].card.labels
    header = ["Label", *[f"{f.name} (on {f.card.metrics.get('split', f.name)})" for f in trained]]
    rows = [["Macro AUC", *[auc_cell(f.card.metrics["ema"].get("macro_auc")) for f in trained]]]
    rows += [[esc(l), *[auc_cell(f.card.metrics["ema"].get("per_label", {}).get(l)) for f in trained]] for l in labels]
    return table(header, rows, ["macro"] + [""] * len(labels))


def roc_figure(predictions: pd.DataFrame, labels: list[str], aucs: dict, fig_dir: Path) -> str:
    targets = np.stack([predictions[f"target_{l}"].to_numpy(dtype=float) for l in labels], axis=1)
    scores = np.stack([predictions[f"prob_{l}"].to_numpy(dtype=float) for l in labels], axis=1)
    known = np.isfinite(targets)
    figs.roc_grid(fig_dir / "roc.png", labels, np.nan_to_num(targets), scores, known, aucs)
    return figure(fig_dir / "roc.png", "ROC curves",
                  "One panel per finding; the dashed diagonal is chance. "
                  "Images whose label the evaluation targets leave out (blank target) are left out.")


def prediction_section(ensemble: EnsembleResults | None, fig_dir: Path) -> str:
    if ensemble is None or ensemble.predictions is None:
        return section("predictions", "Predictions", "",
                       note("Run <code>cxrdist evaluate</code> to see how the findings' predictions and the fold models relate."))
    m = ensemble.metrics
    labels = m["labels"]
    probs = np.stack([ensemble.predictions[f"prob_{l}"].to_numpy(dtype=float) for l in labels], axis=1)
    figs.matrix_heatmap(fig_dir / "label_correlation.png", label_correlation(probs), labels, labels,
                        "Spearman correlation of the ensemble's probabilities", "rank correlation", annotate=True, vlim=1.0)
    body = figure(fig_dir / "label_correlation.png", "label correlation",
                  "Findings whose predicted probabilities rise and fall together across images. Strong correlations can reflect "
                  "anatomy or co-occurrence in the data, or a shared shortcut the models use for both.")
    fold = ensemble.fold_probabilities
    if fold is not None and len(fold["models"]) > 1:
        names = [str(n) for n in fold["models"]]
        agreement = fold_agreement(fold["probabilities"])
        off = agreement[~np.eye(len(names), dtype=bool)]
        shown = agreement.copy()
        np.fill_diagonal(shown, np.nan)  # the diagonal (1.0) would otherwise set the colour scale
        figs.matrix_heatmap(fig_dir / "fold_agreement.png", shown, names, names, "Fold models: mean per-label Spearman correlation",
                            "rank correlation", diverging=False, annotate=True)
        body += "<h3>Fold agreement</h3>" + figure(fig_dir / "fold_agreement.png", "fold agreement",
                       f"How similarly two fold models rank the same images, averaged over findings (1 = identical order). Mean over pairs: "
                       f"{np.nanmean(off):.3f}. Models that agree less make more complementary errors, which is where the ensemble gains.")
    else:
        body += note("Fold agreement needs at least two fold models.")
    return section("predictions", "Predictions",
                   f"How the ensemble's predictions on the {esc(m['split'])} split relate across findings and across fold models.", body)


def coupling_section(folds: list[FoldRun], fig_dir: Path) -> str:
    with_a = [f for f in folds if f.coupling is not None and f.card]
    if not with_a:
        return section("couplings", "Label couplings", "", note("No fold has a best model with the label-graph refinement enabled."))
    blocks, inert_folds = [], {}
    for f in with_a:
        labels = f.card.labels
        sparsity, top = coupling_summary(f.coupling, labels)
        alpha = f.card.model.refine.alpha
        facts = (f"Sparsity {100 * sparsity:.1f}% (off-diagonal entries with |a| ≤ 1e-6), best model at step {esc(f.card.step)}"
                 + (f", α = {alpha}" if alpha is not None else "") + ".")
        inert = inert_message(f.coupling, float(alpha), float(f.card.model.refine.l1))
        if inert:
            inert_folds.setdefault(inert, []).append(f.name)  # one note per distinct message, naming its folds
        if not top:
            continue
        figs.coupling_heatmap(fig_dir / f"coupling_{f.name}.png", f.coupling, labels, f"{f.name}: coupling matrix A")
        rows = [[esc(s), esc(t), f"{v:+.4f}"] for s, t, v in top]
        blocks.append(f'<div><h3>{esc(f.name)}</h3><div class="split"><div>'
                      + figure(fig_dir / f"coupling_{f.name}.png", f"coupling matrix {f.name}", facts)
                      + f'</div><div><p class="explain">Strongest couplings (up to {TOP_COUPLINGS}):</p>'
                      + table(["source", "target", "A"], rows, text_columns=2) + "</div></div></div>")
    blocks[:0] = [note(f"{esc(', '.join(names))}: " + esc(inert) + ".") for inert, names in inert_folds.items()]
    explain = ("The refinement adds α · sigmoid(z) @ A to the backbone's logits z: entry A[i, j] &gt; 0 means evidence for finding i "
               "(row) raises the logit of finding j (column); negative entries suppress. An L1 penalty drives unsupported couplings to exactly zero.")
    return section("couplings", "Label couplings", explain, "".join(blocks))


def training_section(folds: list[FoldRun], fig_dir: Path) -> str:
    series = {f.name: training_series(f) for f in folds}
    if not any(s["step"] or s["eval_step"] for s in series.values()):
        return section("training", "Training", "", note("No metrics.jsonl records yet."))
    figs.training_curves(fig_dir / "training.png", series)
    rows = []
    for f in folds:
        last = f.train[-1] if f.train else {}
        best_auc = (f.card.metrics.get("ema") or {}).get("macro_auc") if f.card else None
        rows.append([esc(f.name), f"{last.get('step', '–')}", fmt(last.get("epoch"), 2), fmt(last.get("loss"), 4),
                     auc_cell(best_auc), esc(f.card.step if f.card else "–"),
                     fmt(last.get("img_per_s"), 0)])
    body = figure(fig_dir / "training.png", "training curves",
                  "Loss and learning rate as logged; validation macro AUC of the EMA weights (solid) and the live weights (dashed) "
                  "on each fold's held-out fold.")
    body += table(["fold", "last step", "epoch", "last loss", "best val AUC (EMA)", "best step", "img/s"], rows)
    return section("training", "Training", "One run per fold, each validated on the fold it holds out.", body)


ON_OFF = {True: "on", False: "off"}


def comparison_section(runs: Path) -> str | None:
    """"Does the refinement help?": the paired comparison `cxrdist compare` wrote to runs/compare (None without one)."""
    path = runs / COMPARE_DIR / COMPARE_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    arm = {k: f"{esc(result[k]['experiment'])} (refinement {ON_OFF.get(result[k]['refine'], '?')})" for k in "ab"}
    splits = {**result["folds"], **({result["split"]: result["test"]} if result.get("test") else {})}
    rows = [[esc(name), auc_cell(c["macro"]["a"]), auc_cell(c["macro"]["b"]), signed(c["macro"]["difference"]),
             esc("–" if not c["macro"]["interval"] else f"{c['macro']['interval'][0]:+.3f} to {c['macro']['interval'][1]:+.3f}")]
            for name, c in splits.items()]
    tally = result["fold_summary"]
    level = round(100 * result["level"])
    explain = (f"A = {arm['a']}, B = {arm['b']}, scored on the same images. B − A with a paired patient-bootstrap {level}% interval "
               f"({result['resamples']} resamples; each resample scores both arms on the same patients). Folds: each fold's best model on "
               f"the fold it held out; {esc(result['split'])}: each arm's fold ensemble. B improved {tally['improved']} of {tally['folds']} folds.")
    body = table(["split", "A macro AUC", "B macro AUC", "B − A", f"{level}% interval"], rows)
    if result.get("inert_note"):
        inert = result["inert_note"]
        body = note(esc(inert[0].upper() + inert[1:]) + ".") + body
    return section("compare", "Does the refinement help?", explain, body)


# ---------------------------------------------------------------- entry point


def show_patient_ids(manifest: Manifest | None, choice: bool | None) -> bool:
    """The user's choice, else no patient ids for a generic CSV (possibly a hospital's data), ids for the public datasets."""
    if choice is not None:
        return choice
    return manifest is not None and (manifest.source or {}).get("name") not in (None, "csv")


def run_report(runs: Path, out: Path | None = None, shards: Location | None = None, patient_ids: bool | None = None) -> Path:
    """Write OUT/report.html (default runs/report) and its figures in OUT/figures; returns the page's path.
    `patient_ids` (default: not for data prepared with --source csv, which may be a hospital's) shows them on sample images."""
    runs = Path(runs)
    out = Path(out) if out is not None else runs / REPORT_DIR
    check_writable_dir(out)
    folds = find_fold_runs(runs)
    root, manifest = find_manifest(folds, shards)
    ensemble = load_ensemble(runs / ENSEMBLE_DIR)
    say_coverage("report", runs, [f.card for f in folds if f.card])
    if ensemble is not None:
        say_stale_ensemble("report", ensemble.metrics.get("model_names") or [], [f.name for f in folds if f.card])
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    experiment = next((f.card.experiment for f in folds if f.card and f.card.experiment), runs.name)
    subtitle, cards = overview(runs, folds, manifest, ensemble)
    sections = [
        ("data", "Data", data_section(root, manifest, fig_dir, show_patient_ids(manifest, patient_ids))),
        ("auc", "Discrimination", auc_section(folds, ensemble, fig_dir)),
        ("predictions", "Predictions", prediction_section(ensemble, fig_dir)),
        ("clinical", "Operating points", clinical_section(ensemble.metrics if ensemble else None, fig_dir,
                                                          evaluated_counts(ensemble.predictions, ensemble.metrics["labels"]) if ensemble else None)),
        ("audit", "Who the model fails", audit_section(ensemble.metrics if ensemble else None, fig_dir)),
        ("saliency", "Saliency", saliency_section(runs, ensemble, root, manifest, fig_dir)),
        ("couplings", "Label couplings", coupling_section(folds, fig_dir)),
        ("training", "Training", training_section(folds, fig_dir)),
    ]
    by_dataset = datasets_section(runs, ensemble.metrics if ensemble else None)
    if by_dataset is not None:
        sections.insert(2, ("datasets", "Datasets", by_dataset))
    comparison = comparison_section(runs)
    if comparison is not None:
        sections.insert(2, ("compare", "Refinement ablation", comparison))
    footer = f"Generated by <code>cxrdist report</code> on {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from <code>{esc(runs)}</code>."
    path = out / PAGE_FILE
    atomic_write_text(path, page(f"cxrdist · {experiment}", subtitle, cards, sections, footer))
    return path
