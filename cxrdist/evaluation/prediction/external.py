"""External validation: a trained ensemble scored on a prepared dataset it was not trained on, over the labels both share.

The external dataset is read like one entry of `data.shards` (data/datasets.py): its labels are harmonised the way
training harmonised the model's (its --source's own definitions, the built-in synonyms, its label_map when `cxrdist
lodo` leaves a data.shards entry out) and matched against the harmonised names the model card records
(labels/harmonise.py); a label the model lacks is not scored (and said), one the dataset lacks is NOT_ANNOTATED and
never scored. Keys and patients are namespaced by its name, plus a split "all" (every split). Refused with one line:
a dataset that shares no label with the model, and one that holds images the model was trained or tested on (the same
shards, the same radiographs re-prepared, resized or re-encoded: data/ingest/leakage.py, or the same patients of one public
source): that is leakage, not external validation. With --leave-out-overlap those images are left out instead, said.

Results go to runs/EXP/external/NAME-ID-SPLIT/, ID from the dataset's manifest identity (its shards' contents) and
label_map: two datasets that share a directory name, a dataset prepared again, or another split never land in one
folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrdist.data.datasets import NAMESPACE_SEPARATOR, CombinedManifest, DatasetEntry, combine, dataset_name
from cxrdist.data.ingest.fingerprint_store import read_fingerprints
from cxrdist.data.ingest.leakage import overlap
from cxrdist.data.location import Location, display, shard_root
from cxrdist.data.manifest import Manifest, SplitInfo
from cxrdist.errors import UserError
from cxrdist.evaluation.scoring.gathered import Predictions
from cxrdist.evaluation.scoring.outputs import default_out
from cxrdist.layout import EXTERNAL_DIR, METRICS_FILE
from cxrdist.text import count

ALL_SPLIT = "all"
IDENTITY_CHARS = 12
LEAVE_OUT_FLAG = "leave-out-overlap"


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


def check_not_trained_on(external: CombinedManifest, train_root, train_manifest: Manifest, leave_out: bool = False) -> LeftOut:
    """Refuse an external dataset that holds what the model was trained or tested on: the same shards, the same
    radiographs (perceptual fingerprints, data/ingest/fingerprint.py) or, a copy of the same public source, the same patients.
    With `leave_out`, those images (and every image of those patients) are what comes back, to be left out."""
    where = display(external.entries[0].location)
    trained = dict(zip((e.name for e in train_manifest.entries), train_manifest.entries)) if hasattr(train_manifest, "entries") else {}
    members = getattr(train_manifest, "members", {"": train_manifest})
    (entry,) = external.entries
    own = external.members[entry.name]
    if any(member.identity()["content_sha256"] == own.identity()["content_sha256"] for member in members.values()):
        raise UserError(f"--external {where}: the model was trained on these very shards; that is leakage, not external validation")
    table = read_fingerprints(entry.location, own)
    rows: set[int] = set()
    for name, member in members.items():
        shared = overlap(read_fingerprints(trained[name].location if name else train_root, member), member.source.get("name"),
                         table, own.source.get("name"))
        if shared and not leave_out:
            raise UserError(f"--external {where}: has {shared.describe()} of the data the model was trained and tested on; that is "
                            f"leakage, not external validation (--{LEAVE_OUT_FLAG} scores the rest)")
        rows.update(shared.rows_of_b().tolist() if shared else [])
    left = table.take(np.array(sorted(rows), dtype=np.int64))
    if len(left) == len(table):
        raise UserError(f"--external {where}: every one of its images is in the data the model was trained and tested on; nothing is left to score")
    return LeftOut({entry.name + NAMESPACE_SEPARATOR + key for key in left.key}, len(set(left.patient.tolist())))


@dataclass
class LeftOut:
    """External images left out as leakage (namespaced keys), and how many patients they belong to."""

    keys: set[str]
    patients: int

    def note(self) -> str | None:
        if not self.keys:
            return None
        return (f"left out {count(len(self.keys), 'external image')} of {count(self.patients, 'patient')} that are in the data the model "
                "was trained and tested on (the same radiographs, or patients of the same source)")

    def apply(self, preds: Predictions) -> Predictions:
        keep = [i for i, key in enumerate(preds.keys) if key not in self.keys]
        return Predictions([preds.keys[i] for i in keep], {name: value[keep] for name, value in preds.logits.items()}, preds.raw[keep],
                           preds.corrupt, {name: [values[i] for i in keep] for name, values in preds.meta.items()})
