"""`cxrdist export`: the fold ensemble as one ONNX or TorchScript file, its preprocessor and a JSON sidecar.

The file takes a float32 batch (B, in_chans, img_size, img_size) and returns (B, labels) probabilities: fold
models averaged, the Label-Graph Refinement included, optionally averaged with the mirrored view (flip TTA).
Beside it, `preprocess.py` (a copy of data/preprocess.py: numpy + Pillow, pydicom for DICOM) turns a
radiograph file into one input exactly as `cxrdist predict` does, with the keyword arguments the sidecar's
preprocessing "arguments" holds. The sidecar carries the label order, the preprocessing (file, arguments, steps,
resize filter, library versions), and the operating-point thresholds and temperatures fitted on the out-of-fold
predictions (from the ensemble's metrics.json, when `cxrdist evaluate` has been run). The three files are written
atomically (cxrdist/atomic.py), the sidecar last.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from cxrdist.atomic import atomic_path, atomic_write_bytes, atomic_write_json, check_not_an_input, check_writable_file
from cxrdist.data import preprocess
from cxrdist.data.spec import LEGACY_RESAMPLER, ImageSpec
from cxrdist.data.transforms import channel_stats, eval_draft_side, model_input_arguments
from cxrdist.errors import UserError
from cxrdist.evaluation.prediction.coverage import say_coverage
from cxrdist.evaluation.prediction.models import groups_by_preprocessing, load_fold_models
from cxrdist.evaluation.prediction.predict import image_settings
from cxrdist.evaluation.scoring.outputs import default_out
from cxrdist.layout import METRICS_FILE
from cxrdist.log import get_logger
from cxrdist.model.ensemble_module import EnsembleProbabilities

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
PREPROCESSOR_FILE = "preprocess.py"  # beside the model file
PREPROCESSOR_MARKER = b'"""Reference preprocessing of cxrdist models'  # how preprocess.py begins
LOG = get_logger("export")


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def operating_thresholds(metrics_path: Path, labels: list[str]) -> tuple[dict | None, dict]:
    """({label: {point: threshold}}, the calibration section) from an evaluation's metrics.json of models with
    these `labels`, or (None, {})."""
    if not metrics_path.is_file():
        return None, {}
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{metrics_path}: not a readable metrics.json ({err})") from None
    if not isinstance(metrics, dict) or metrics.get("labels") != labels:
        raise UserError(f"{metrics_path}: its labels are not the models' labels ({', '.join(labels)}); "
                        "give the metrics.json `cxrdist evaluate` wrote for this experiment")
    points = (metrics.get("operating_points") or {}).get("per_label")
    thresholds = {label: {name: p["threshold"] for name, p in per.items()} for label, per in points.items()} if points else None
    return thresholds, metrics.get("calibration") or {}


def sidecar(models, settings: dict, fmt: str, tta: bool, metrics_path: Path) -> dict:
    card = models[0].card
    img_size, in_chans = card.image.size, card.image.channels
    mean, std = channel_stats(card.image)
    thresholds, calibration = operating_thresholds(metrics_path, card.labels)
    return {
        "format": fmt,
        "input": {"name": INPUT_NAME, "shape": ["batch", in_chans, img_size, img_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", card.num_labels], "dtype": "float32",
                   "meaning": "per-label probability: sigmoid of the refined logits, averaged over views and fold models"},
        "labels": card.labels,
        "harmonised_labels": card.vocabulary.harmonised,  # each label's name across datasets (labels/harmonise.py, `cxrdist labels`)
        "preprocessing": {
            "preprocessor": PREPROCESSOR_FILE, "function": "model_input",
            "arguments": model_input_arguments(card.image, settings),
            "resize_filter": resize_filter(card.image),
            "steps": preprocessing_steps(card.image, settings),
            "made_with": library_versions(),
            "img_size": img_size, "in_chans": in_chans, "mean": list(mean), "std": list(std),
            "interpolation": card.image.interpolation, "image": settings,
        },
        "tta": tta,
        "models": [m.name for m in models],
        "thresholds": thresholds,
        "threshold_rule": "positive when probability >= threshold; chosen on the out-of-fold predictions" if thresholds else None,
        "temperatures": calibration.get("temperature"),  # recalibrated p = sigmoid(logit(p) / T)
        "platt": calibration.get("platt"),  # [a, b]: recalibrated p = sigmoid(a * logit(p) + b)
        "notes": [] if thresholds else [f"no {metrics_path}: run `cxrdist evaluate` first to get operating-point thresholds"],
    }


def resize_filter(spec: ImageSpec) -> str:
    if spec.resampler == LEGACY_RESAMPLER:
        return (f"{spec.interpolation}: torchvision.transforms.v2.functional.resize(antialias=True) of the uint8 image (this model's "
                f"card predates the Pillow resize; {PREPROCESSOR_FILE} then needs torch and torchvision)")
    return f"{spec.interpolation}: Pillow Image.resize(Image.Resampling.{spec.interpolation.upper()}) of the 8-bit image, antialiased when shrinking"


def preprocessing_steps(spec: ImageSpec, settings: dict) -> list[str]:
    stored = f"{settings['format']}" + (f" (quality {settings.get('quality', 95)})" if settings["format"] == "jpg" else "")
    return [
        f"{PREPROCESSOR_FILE}: model_input(path, **arguments) per radiograph (PNG, JPEG, DICOM), np.stack into a batch",
        "read as 8-bit grayscale, bone bright (DICOM: modality LUT, VOI LUT or window, MONOCHROME1 inverted)",
        f"long side resized to at most {settings['max_size']} px and stored as {stored}, as the training images were",
        f"decoded (a JPEG at least twice {eval_draft_side(spec)} px on both sides at 1/2, 1/4 or 1/8 scale, never below it, libjpeg's DCT scaling), "
        f"then the whole image resized to {spec.size}x{spec.size}, {resize_filter(spec)}",
        f"x / 255, then (x - mean) / std per channel, grayscale repeated to {spec.channels} channel(s)",
    ]


def library_versions() -> dict:
    """The versions whose resampling, JPEG coding and DICOM display transforms the pixels depend on (PIL.features names
    libjpeg(-turbo))."""
    import numpy
    import PIL
    import pydicom
    from PIL import features

    return {"pillow": PIL.__version__, "libjpeg": features.version("jpg"), "numpy": numpy.__version__, "pydicom": pydicom.__version__}


def check_preprocessor_place(out: Path, path: Path) -> None:
    """`path` (beside `out`) may receive data/preprocess.py: nothing there, or an older export's copy."""
    if out.name == path.name:
        raise UserError(f"--out {out}: {PREPROCESSOR_FILE} is the name of the preprocessor written beside the model; choose another name")
    if path.exists() and not (path.is_file() and path.read_bytes().startswith(PREPROCESSOR_MARKER)):
        raise UserError(f"{path}: exists and is not a cxrdist preprocessor (export writes {PREPROCESSOR_FILE} beside the model); "
                        "export into another folder")


def write_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401 - the exporter needs it
    except ImportError:
        raise UserError("--format onnx needs the onnx package: pip install 'cxrdist[export]'") from None
    torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False)


def write_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(path))


def run_export(runs: Path, fmt: str, out: Path, tta: bool = False, metrics: Path | None = None) -> Path:
    """Write the ensemble to `out`, data/preprocess.py beside it and `out`.json; returns `out`."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    models = load_fold_models(runs, "cpu")
    metrics_path = Path(metrics) if metrics else default_out(runs) / METRICS_FILE
    preprocessor = Path(out).parent / PREPROCESSOR_FILE
    for path in (Path(out), sidecar_path(Path(out)), preprocessor):
        check_writable_file(path)
        check_not_an_input(path, [metrics_path, *(m.directory for m in models)])
    check_preprocessor_place(Path(out), preprocessor)
    if len(groups_by_preprocessing(models)) > 1:
        raise UserError(f"{runs}: the fold models take differently preprocessed inputs; export them separately")
    image = models[0].card.image
    module = EnsembleProbabilities([m.model for m in models], tta).eval()
    example = torch.zeros(2, image.channels, image.size, image.size)
    card = sidecar(models, image_settings(models), fmt, tta, metrics_path)
    coverage = say_coverage("export", runs, [m.card for m in models])
    card["notes"] += [coverage] if coverage else []
    if card["thresholds"] is None:
        LOG.warning(f"cxrdist export: warning: {card['notes'][0]}; the sidecar's thresholds are null")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the model and the preprocessor first: the sidecar names files that exist
    with atomic_path(out, suffix=out.suffix or ".tmp") as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks frozen for this input shape, as intended
        (write_onnx if fmt == "onnx" else write_torchscript)(module, example, tmp)
    atomic_write_bytes(preprocessor, Path(preprocess.__file__).read_bytes())
    atomic_write_json(sidecar_path(out), card)
    return out
