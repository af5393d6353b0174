"""External validation: a trained ensemble scored on a prepared dataset it was not trained on, over the labels both share.

The external dataset is read like one entry of `data.shards` (data/datasets.py): its labels harmonised onto the
model's (built-in synonyms; a label the model lacks is dropped, one the dataset lacks is NOT_ANNOTATED and never
scored), its keys and patients namespaced by its name, plus a split "all" (every split). Refused with one line:
a dataset that shares no label with the model, and one that holds images the model was trained or tested on (the same
shards, the same radiographs re-prepared, resized or re-encoded: data/leakage.py, or the same patients of one public
source): that is leakage, not external validation. With --leave-out-overlap those images are left out instead, said.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxrdist.data.datasets import NAMESPACE_SEPARATOR, CombinedManifest, DatasetEntry, combine, dataset_name, load_manifest
from cxrdist.data.fingerprint_store import read_fingerprints
from cxrdist.data.leakage import overlap
from cxrdist.data.location import Location, display, shard_root
from cxrdist.data.manifest import Manifest, SplitInfo
from cxrdist.errors import UserError
from cxrdist.evaluation.scoring.gathered import Predictions
from cxrdist.labels.harmonise import harmonised_name
from cxrdist.text import count

ALL_SPLIT = "all"
LEAVE_OUT_FLAG = "leave-out-overlap"


def open_external(location: Location | DatasetEntry, labels: Sequence[str]) -> tuple[tuple[DatasetEntry, ...], CombinedManifest]:
    """(root, manifest) of the external dataset in the model's label order, with an "all" split. A DatasetEntry (a
    `data.shards` entry, as `cxrdist lodo` passes the dataset it left out) keeps its name and label_map."""
    given = location if isinstance(location, DatasetEntry) else None
    root = shard_root(given.location if given else location)
    label_map = dict(given.label_map) if given else {}
    own = load_manifest(root)
    drop = {name: None for name in own.labels if harmonised_name(name, label_map) not in labels}
    if len(drop) == len(own.labels):
        raise UserError(f"--external {display(root)}: shares no label with the model (its labels: {', '.join(own.labels)}; "
                        f"the model's: {', '.join(labels)})")
    name = given.name if given else dataset_name(root)
    entries = (DatasetEntry(name, root, label_map={**label_map, **drop}),)
    manifest = combine(entries, vocabulary=list(labels))
    shards = manifest.shards(list(manifest.splits))
    manifest.splits[ALL_SPLIT] = SplitInfo(sum(s.num_samples for s in shards), sum(sp.num_patients for sp in manifest.splits.values()), shards)
    return entries, manifest


def check_not_trained_on(external: CombinedManifest, train_root, train_manifest: Manifest, leave_out: bool = False) -> LeftOut:
    """Refuse an external dataset that holds what the model was trained or tested on: the same shards, the same
    radiographs (perceptual fingerprints, data/fingerprint.py) or, a copy of the same public source, the same patients.
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
