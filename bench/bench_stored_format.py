"""How far predictions move between a JPEG-q95-stored and a losslessly stored radiograph.

`cxrdist predict` (and an exported model's preprocess.py) replays how `prepare` stored the training images: a new
radiograph is shrunk to the card's max_size, stored in the card's format (JPEG quality 95 by default), decoded
(a JPEG at least twice training's draft side at 1/2, 1/4 or 1/8 scale: libjpeg's DCT scaling), then resized.
This runs the fold ensemble of --runs (trained on JPEG-stored shards) on --images four ways, built from
data/preprocess.py's steps:
  (a) as predict: JPEG q95, DCT-scaled decode at the card's draft side (checked equal to predict's own output);
  (b) JPEG q95, full decode, then the resize: (a) vs (b) is the DCT-scaled decode alone;
  (c) PNG (lossless), same max_size: (b) vs (c) is the JPEG quantisation alone, (a) vs (c) both;
  (d) JPEG q95, DCT-scaled decode at the input size (what evaluation did before it used training's draft side);
and prints how far the ensemble's probabilities move between them, and with --labels (a CSV with a `path` column
that ends each image's path, and the models' label columns: 1 positive, blank or 0 negative, -1 left out) the macro AUC.

    python bench/bench_stored_format.py --runs runs/EXP --images new_cxrs/ [--labels labels.csv] [--no-tta] [--limit 500]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from cxrdist.data import preprocess
from cxrdist.data.transforms import channel_stats, eval_draft_side
from cxrdist.evaluation.prediction.models import ensemble_probabilities, load_fold_models, model_probabilities, view_modules
from cxrdist.evaluation.prediction.predict import collect_images, image_settings, predict_files


def model_inputs(files: list[Path], stored: dict, spec, draft_side: int | None) -> torch.Tensor:
    mean, std = channel_stats(spec)
    batch = []
    for path in files:
        data = preprocess.stored_image(path, stored["format"], int(stored["max_size"]), int(stored.get("quality", 95)))
        gray = preprocess.decode(data, draft_side)
        batch.append(preprocess.normalise(preprocess.resize_square(gray, spec.size, spec.interpolation, spec.resampler), mean, std))
    return torch.from_numpy(np.stack(batch))


@torch.no_grad()
def ensemble(models, images: torch.Tensor, tta: bool) -> np.ndarray:
    modules = view_modules(models, tta)
    logits = {name: torch.cat([module(chunk).float() for chunk in images.split(64)]).numpy() for name, module in modules.items()}
    return ensemble_probabilities({m.name: model_probabilities(logits, m.name, tta) for m in models})


def shift(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a - b)
    return {"max": round(float(diff.max()), 4), "p99": round(float(np.quantile(diff, 0.99)), 4), "median": round(float(np.median(diff)), 4),
            "mean": round(float(diff.mean()), 4), "decisions_at_0.5_flipped": int(((a >= 0.5) != (b >= 0.5)).sum())}


def macro_auc(files: list[Path], labels_csv: Path, labels: list[str], probs: np.ndarray) -> float:
    table = pd.read_csv(labels_csv)
    by_path = {str(p): i for i, p in enumerate(table["path"])}
    rows = [next(i for suffix, i in by_path.items() if str(f).endswith(suffix)) for f in files]
    targets = table.loc[rows, labels].fillna(0).to_numpy(dtype=float)
    aucs = [roc_auc_score(targets[keep, j], probs[keep, j]) for j in range(len(labels))
            if len(set(targets[keep := targets[:, j] != -1, j])) == 2]
    return round(float(np.mean(aucs)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--images", type=Path, nargs="+", required=True)
    parser.add_argument("--labels", type=Path, help="CSV of the images' labels: report each way's macro AUC")
    parser.add_argument("--no-tta", dest="tta", action="store_false")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    models = load_fold_models(args.runs)
    files = collect_images(args.images)[: args.limit or None]
    stored = image_settings(models)
    if stored["format"] != "jpg":
        raise SystemExit(f"{args.runs}: trained on {stored['format']}-stored shards; this compares against JPEG-stored training")
    spec = models[0].card.image
    lossless = {**stored, "format": "png"}
    probs = {
        "a": ensemble(models, model_inputs(files, stored, spec, eval_draft_side(spec)), args.tta),
        "b": ensemble(models, model_inputs(files, stored, spec, None), args.tta),
        "c": ensemble(models, model_inputs(files, lossless, spec, eval_draft_side(spec)), args.tta),
        "d": ensemble(models, model_inputs(files, stored, spec, spec.size), args.tta),
    }
    _, predicted, bad = predict_files(models, files, stored, args.tta, 32, 0, "cpu")
    assert not bad and np.abs(predicted - probs["a"]).max() < 1e-5, "(a) is not what predict computes"
    card = models[0].card
    result = {
        "runs": str(args.runs), "models": [m.name for m in models], "backbone": card.model.backbone, "img_size": spec.size,
        "interpolation": spec.interpolation, "stored": stored, "images": len(files), "labels": card.num_labels, "tta": args.tta,
        "probability_range": [round(float(probs["a"].min()), 4), round(float(probs["a"].max()), 4)],
        "decisions": int(probs["a"].size),
        "a_vs_c: jpeg q95 + dct-scaled decode vs lossless": shift(probs["a"], probs["c"]),
        "a_vs_b: dct-scaled decode alone": shift(probs["a"], probs["b"]),
        "b_vs_c: jpeg q95 quantisation alone": shift(probs["b"], probs["c"]),
        "a_vs_d: training's draft side vs the input size": shift(probs["a"], probs["d"]),
        "draft_side": eval_draft_side(spec),
    }
    if args.labels:
        result["macro_auc"] = {way: macro_auc(files, args.labels, card.labels, p) for way, p in probs.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
