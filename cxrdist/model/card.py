"""model.json: the typed contract between training (which writes it) and evaluation, prediction and
the report (which read it). Written and read only here; readers use attributes, never keys."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cxrdist.data.datasets import label_vocabulary
from cxrdist.data.location import Location, resolved
from cxrdist.data.spec import LEGACY_EVAL_DECODE, LEGACY_RESAMPLER, ImageSpec
from cxrdist.errors import UserError
from cxrdist.labels.eval_targets import DEFAULT_EVAL_TARGETS, EVAL_TARGETS
from cxrdist.labels.harmonise import LabelVocabulary, legacy_vocabulary
from cxrdist.layout import CARD_FILE
from cxrdist.model.config import ModelConfig, RefineConfig

CARD_FORMAT_VERSION = 3  # 3: the label vocabulary (harmonised names) is recorded
READABLE_VERSIONS = (2, 3)  # a version-2 card loads with its vocabulary derived from its labels (legacy_vocabulary)
CARD_KIND = "cxrdist-model"
STORED_IMAGE_KEYS = ("format", "max_size")


@dataclass
class CardEvaluation:
    """What the AUCs of a card's `metrics` were scored against (cxrdist/labels/eval_targets.py), next to the
    training policy they do not depend on (the same as the card's label_policy)."""

    targets: str  # the evaluation rule: ignore_uncertain | zeros | ones
    training_policy: dict[str, str]  # label -> the uncertainty policy the loss saw

    @classmethod
    def of(cls, rule: str, labels: list[str], training_policy: list[str]) -> CardEvaluation:
        return cls(rule, dict(zip(labels, training_policy)))

    @classmethod
    def from_dict(cls, data: Any, label_policy: dict[str, str]) -> CardEvaluation:
        """The card's section; an empty one (a card written before the rule was recorded) is the default rule."""
        if not data:
            return cls(DEFAULT_EVAL_TARGETS, dict(label_policy))
        if not isinstance(data, dict) or set(data) != {"targets", "training_policy"}:
            raise UserError(f"evaluation must hold targets and training_policy, got {data!r}")
        return cls(data["targets"], dict(data["training_policy"]))

    def problems(self, label_policy: dict[str, str]) -> list[str]:
        found = []
        if self.targets not in EVAL_TARGETS:
            found.append(f"evaluation.targets {self.targets!r} is not one of {', '.join(EVAL_TARGETS)}")
        if self.training_policy != label_policy:
            found.append("evaluation.training_policy differs from label_policy")
        return found


def read_image_spec(image: dict) -> ImageSpec:
    """The card's image section; one without a resampler was written when torchvision resized for evaluation, one
    without eval_decode when evaluation decoded stored JPEGs at the input size: its models keep that resampler and
    decode, so re-evaluating them gives the numbers their cards hold (data/spec.py)."""
    legacy = {"resampler": LEGACY_RESAMPLER, "eval_decode": LEGACY_EVAL_DECODE}
    return ImageSpec(**{**legacy, **image, "mean": tuple(image["mean"]), "std": tuple(image["std"])})


@dataclass
class ModelCard:
    """Everything needed to rebuild a trained model, feed it, and say what it was trained and scored on."""

    model: ModelConfig  # the architecture (pretrained weights are not needed to rebuild it)
    labels: list[str]  # head order
    label_policy: dict[str, str]  # label -> the uncertainty policy it was trained with
    image: ImageSpec  # the input tensor: size, channels, normalisation, interpolation
    stored_image: dict  # how `prepare` stored the pixels: {"format", "max_size", "quality"} (the manifest's)
    dataset: dict  # Manifest.identity() of the shards it was trained on
    shards: Any  # where those shards were: absolute path at training time, or the URL without credentials (several datasets: their entries)
    experiment: str
    fold: int
    step: int
    epoch: float
    eval_batch_size: int  # the batch size of the validation pass (padded: logits do not depend on batching)
    metrics: dict  # {"split": "fold-K", "ema": auc summary, "live": auc summary}
    evaluation: CardEvaluation  # the rule that turned raw labels into the AUC targets of `metrics`
    vocabulary: LabelVocabulary  # each label's harmonised name and where the vocabulary came from (labels/harmonise.py)
    extra: dict = field(default_factory=dict)  # further top-level sections, kept as they are
    format_version: int = CARD_FORMAT_VERSION

    @classmethod
    def build(cls, model: ModelConfig, labels: list[str], policy: list[str], image: ImageSpec, manifest, shards: Location,
              experiment: str, fold: int, step: int, epoch: float, eval_batch_size: int, metrics: dict,
              evaluation: CardEvaluation | None = None, **extra: Any) -> ModelCard:
        """The one way training makes a card (`manifest` is the data.manifest.Manifest trained on; `evaluation`
        what `metrics` was scored against, the default rule when not given)."""
        architecture = ModelConfig(**{**asdict(model), "pretrained": False, "pretrained_path": None, "refine": RefineConfig(**asdict(model.refine))})
        return cls(
            model=architecture, labels=list(labels), label_policy=dict(zip(labels, policy)), image=image,
            stored_image=dict(manifest.image), dataset=manifest.identity(), shards=resolved(shards),
            experiment=experiment, fold=int(fold), step=int(step), epoch=float(epoch), eval_batch_size=int(eval_batch_size),
            metrics=metrics, evaluation=evaluation or CardEvaluation.of(DEFAULT_EVAL_TARGETS, labels, policy),
            vocabulary=label_vocabulary(shards, manifest), extra=dict(extra),
        )

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def policy(self) -> list[str]:
        """The training policy in label order."""
        return [self.label_policy[label] for label in self.labels]

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"kind": CARD_KIND, "format_version": self.format_version}
        for f in fields(self):
            if f.name not in ("extra", "format_version"):
                data[f.name] = getattr(self, f.name)
        data["model"] = asdict(self.model)
        data["image"] = self.image.to_dict()
        data["evaluation"] = asdict(self.evaluation)
        data["vocabulary"] = self.vocabulary.to_dict()
        data.update(self.extra)
        return data

    def to_json(self) -> str:
        from cxrdist.atomic import json_ready

        return json.dumps(json_ready(self.to_dict()), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = CARD_FILE) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = CARD_FILE) -> ModelCard:
        if not isinstance(data, dict) or data.get("kind") != CARD_KIND:
            version = data.get("format_version") if isinstance(data, dict) else None
            hint = "an older cxrdist wrote it; retrain or export it again" if version is not None else "not a cxrdist model card"
            raise UserError(f"{where}: {hint} (expected kind {CARD_KIND!r}, format version {CARD_FORMAT_VERSION})")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise UserError(f"{where}: model card format version {version!r}, this cxrdist reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
        known = {f.name for f in fields(cls)} - {"extra"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - {"evaluation", "vocabulary"}
        if version >= 3:
            required.add("vocabulary")
        missing = sorted(required - set(data))
        if missing:
            raise UserError(f"{where}: model card lacks {', '.join(missing)}")
        try:
            model = dict(data["model"])
            refine = RefineConfig(**model.pop("refine"))
            card = cls(
                **{name: data[name] for name in known if name not in ("model", "image", "evaluation", "vocabulary", "format_version")},
                model=ModelConfig(**model, refine=refine),
                evaluation=CardEvaluation.from_dict(data.get("evaluation"), data["label_policy"]),
                vocabulary=card_vocabulary(data, version),
                image=read_image_spec(data["image"]),
                extra={k: v for k, v in data.items() if k not in known and k != "kind"},
            )
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{where}: malformed model card ({err})") from None
        card.validate(where)
        return card

    def validate(self, where: str = CARD_FILE) -> None:
        problems = []
        if not self.labels or not all(isinstance(label, str) for label in self.labels):
            problems.append("labels must be a non-empty list of names")
        elif sorted(self.label_policy) != sorted(self.labels):
            problems.append("label_policy must name every label once")
        else:
            problems += self.evaluation.problems(self.label_policy)
        if any(key not in self.stored_image for key in STORED_IMAGE_KEYS):
            problems.append(f"stored_image needs {', '.join(STORED_IMAGE_KEYS)}")
        if self.image.channels != self.model.in_chans:
            problems.append(f"image.channels={self.image.channels} but model.in_chans={self.model.in_chans}")
        if not isinstance(self.metrics, dict) or not isinstance(self.dataset, dict):
            problems.append("metrics and dataset must be objects")
        if problems:
            raise UserError(f"{where}: invalid model card: {'; '.join(problems)}")

    # ---- files ------------------------------------------------------------------------------
    def write(self, directory: Path) -> Path:
        from cxrdist.atomic import atomic_write_text

        path = Path(directory) / CARD_FILE
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def read(cls, directory: Path) -> ModelCard:
        """The card of a model directory (best/); a missing, old or foreign card is a one-line UserError."""
        path = Path(directory) / CARD_FILE
        if not path.is_file():
            raise UserError(f"{directory}: no {CARD_FILE} (not a trained model)")
        return cls.from_json(path.read_text(), str(path))


def card_vocabulary(data: dict, version: int) -> LabelVocabulary:
    """The card's vocabulary section; a version-2 card (before it was recorded) gets the one its labels imply."""
    labels = data["labels"]
    if version < 3:
        return legacy_vocabulary(labels, isinstance(data.get("shards"), list))
    return LabelVocabulary.from_dict(data["vocabulary"], len(labels) if isinstance(labels, list) else -1)
