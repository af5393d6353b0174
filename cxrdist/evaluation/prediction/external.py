"""External validation: a trained ensemble scored on a prepared dataset it was not trained on, over the labels both share.

The external dataset is read like one entry of `data.shards` (data/datasets.py): its labels are harmonised the way
training harmonised the model's (its --source's own definitions, the built-in synonyms, its label_map when `cxrdist
lodo` leaves a data.shards entry out) and matched against the harmonised names the model card records
(labels/harmonise.py); a label the model lacks is not scored (and said), one the dataset lacks is NOT_ANNOTATED and
never scored. Keys and patients are namespaced by its name, plus a split "all" (every split). Refused with one line:
a dataset that shares no label with the model, and one that holds images the model was trained on (the same shards,
or the same image bytes re-prepared): that is leakage, not external validation.

Results go to runs/EXP/external/NAME-ID-SPLIT/, ID from the dataset's manifest identity (its shards' contents) and
label_map: two datasets that share a directory name, a dataset prepared again, or another split never land in one
folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
from dataclasses import dataclass
from pathlib import Path

from cxrdist.data.datasets import CombinedManifest, DatasetEntry, combine, dataset_name
from cxrdist.data.location import Location, display, shard_root
from cxrdist.data.manifest import Manifest, SplitInfo
from cxrdist.data.stream import read_shards
from cxrdist.errors import UserError
from cxrdist.evaluation.scoring.outputs import default_out
from cxrdist.layout import EXTERNAL_DIR, METRICS_FILE

ALL_SPLIT = "all"
IDENTITY_CHARS = 12


@dataclass
class ExternalDataset:
    """A prepared dataset opened for scoring by a model: its samples in the model's label order, and how its labels matched."""

    root: tuple[DatasetEntry, ...]  # the one entry (name, location, label_map)
    manifest: CombinedManifest  # in the model's label order, with an "all" split
    identity: str  # IDENTITY_CHARS hex digits of its manifest identity and label_map
    not_in_model: list[str]  # its labels the model has no head for (not scored)

    @property
    def name(self) -> str:
        return self.root[0].name

    def folder(self, split: str) -> str:
        return result_folder(self.name, self.identity, split)

    def record(self, split: str) -> dict:
        """What metrics.json records of the dataset (`external_dataset`)."""
        entry = self.root[0]
        member = self.manifest.members[entry.name]
        return {"name": entry.name, "location": display(entry.location), "identity": self.identity, "split": split,
                "content_sha256": member.identity()["content_sha256"], "label_map": dict(entry.label_map),
                "labels": list(member.labels), "not_in_model": list(self.not_in_model)}


def open_external(location: Location | DatasetEntry, labels: Sequence[str], harmonised: Sequence[str]) -> ExternalDataset:
    """The external dataset in the model's label order (`labels`, whose harmonised names are `harmonised`), with an "all"
    split. A DatasetEntry (a `data.shards` entry, as `cxrdist lodo` passes the dataset it left out) keeps its name and
    label_map."""
    given = location if isinstance(location, DatasetEntry) else None
    root = shard_root(given.location if given else location)
    entry = DatasetEntry(given.name if given else dataset_name(root), root, label_map=dict(given.label_map) if given else {})
    manifest = combine((entry,), vocabulary=list(harmonised), skip_outside=True)
    own = manifest.members[entry.name]
    not_in_model = manifest.outside.get(entry.name, [])
    shards = manifest.shards(list(manifest.splits))
    if not any(index is not None for index in shards[0].columns):
        raise UserError(f"--external {display(root)}: shares no label with the model (its labels: {', '.join(own.labels)}; "
                        f"the model's, harmonised: {', '.join(harmonised)})")
    manifest.splits[ALL_SPLIT] = SplitInfo(sum(s.num_samples for s in shards), sum(sp.num_patients for sp in manifest.splits.values()), shards)
    manifest.labels = list(labels)  # the rows are in the model's order; its own names label them
    return ExternalDataset((entry,), manifest, dataset_identity(own, entry.label_map), not_in_model)


def dataset_identity(manifest: Manifest, label_map: dict) -> str:
    """IDENTITY_CHARS hex digits of a dataset's manifest identity (labels, folds, every shard's content) and label_map."""
    return hashlib.sha256(json.dumps([manifest.identity(), label_map], sort_keys=True).encode()).hexdigest()[:IDENTITY_CHARS]


def result_folder(name: str, identity: str, split: str) -> str:
    """The folder name of an external result under runs/EXP/external/."""
    return f"{name}-{identity}-{split}"


def external_out(experiment_dir: Path, dataset: ExternalDataset, split: str) -> Path:
    """runs/EXP/external/NAME-ID-SPLIT: where an external result of `dataset` on `split` goes by default."""
    return Path(experiment_dir) / EXTERNAL_DIR / dataset.folder(split)


def choose_out(runs: Path, out: Path | None, dataset: ExternalDataset | None, split: str) -> Path:
    """Where an evaluation of `runs` writes: `out`, else runs/EXP/ensemble (internal) or external_out. Refused: an external
    result over the internal evaluation, and any result over another dataset's or split's external result (or an
    external one over an internal one)."""
    internal = default_out(runs)
    if out is None:
        out = external_out(internal.parent, dataset, split) if dataset is not None else internal
    elif dataset is not None and Path(out).resolve() == internal.resolve():
        raise UserError(f"--out {out}: that is the experiment's internal evaluation, which an external result must not replace; "
                        f"leave --out out (default: {external_out(internal.parent, dataset, split)}) or give another folder")
    check_not_another_result(Path(out), result_key(dataset, split))
    return Path(out)


def result_key(dataset: ExternalDataset | None, split: str) -> dict:
    """What makes two evaluations the same result: internal or which external dataset, and the split."""
    return {"external": dataset.identity if dataset is not None else None, "split": split}


def recorded_key(metrics) -> dict | None:
    if not isinstance(metrics, dict):
        return None
    record = metrics.get("external_dataset")
    identity = record.get("identity") if isinstance(record, dict) else ("unknown" if metrics.get("external") else None)
    return {"external": identity, "split": metrics.get("split")}


def check_not_another_result(out: Path, key: dict) -> None:
    """Refuse `out` when its metrics.json is another dataset's (or split's) external result, or an internal one that an
    external result would replace (an internal evaluation of another split may replace an internal one, as always)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    try:
        found = recorded_key(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        found = None
    if found == key or (found is not None and found["external"] is None and key["external"] is None):
        return
    what = ("a metrics.json cxrdist cannot read" if found is None else
            f"the internal evaluation of split {found['split']!r}" if found["external"] is None else
            f"the external result of dataset id {found['external']}, split {found['split']!r}")
    raise UserError(f"--out {out} holds {what}, which this evaluation would replace; give another --out (or remove that folder)")


def check_scorable(dataset: ExternalDataset, split: str, targets: np.ndarray, mask: np.ndarray, labels: Sequence[str]) -> None:
    """Refuse an external evaluation in which no label has both classes (nothing to score, only a NaN)."""
    for j in range(len(labels)):
        if len(np.unique(targets[mask[:, j] > 0, j])) == 2:
            return
    scored = [(label, targets[mask[:, j] > 0, j]) for j, label in enumerate(labels) if (mask[:, j] > 0).any()]
    negative = [label for label, y in scored if not y.any()]
    positive = [label for label, y in scored if y.all()]
    raise UserError(f"--external {display(dataset.root[0].location)} (split {split}): no label the model and the dataset share has "
                    f"both positive and negative images (never positive: {short_list(negative)}; always positive: {short_list(positive)}), "
                    "so there is nothing to score; score all of it (--split all) or another dataset")


def short_list(names: Sequence[str], shown: int = 4) -> str:
    if not names:
        return "none"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_not_trained_on(external: CombinedManifest, train_root, train_manifest: Manifest) -> None:
    """Refuse an external dataset whose shards or image bytes the training datasets hold."""
    trained = getattr(train_manifest, "members", {"": train_manifest})
    (ext,) = external.members.values()
    if any(member.identity()["content_sha256"] == ext.identity()["content_sha256"] for member in trained.values()):
        raise UserError(f"--external {display(external.entries[0].location)}: the model was trained on these very shards; "
                        "that is leakage, not external validation")
    seen = image_digests(train_root, train_manifest)
    shared = image_digests(external.entries, external, ALL_SPLIT) & seen
    if shared:
        raise UserError(f"--external {display(external.entries[0].location)}: {len(shared)} of its images are in the data the model was "
                        "trained on (the same files prepared again?); that is leakage, not external validation")


def image_digests(root, manifest: Manifest, split: str | None = None) -> set[str]:
    """The sha256 of every stored image of `split` (default: every split)."""
    shards = manifest.split(split).shards if split else manifest.shards(list(manifest.splits))
    return {hashlib.sha256(sample.image).hexdigest() for sample in read_shards(root, shards) if sample.image is not None}
