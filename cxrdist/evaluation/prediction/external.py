"""External validation: a trained ensemble scored on a prepared dataset it was not trained on, over the labels both share.

The external dataset is read like one entry of `data.shards` (data/datasets.py): its labels harmonised onto the
model's (built-in synonyms; a label the model lacks is dropped, one the dataset lacks is NOT_ANNOTATED and never
scored), its keys and patients namespaced by its name, plus a split "all" (every split). Refused with one line:
a dataset that shares no label with the model, and one that holds images the model was trained on (the same
shards, or the same image bytes re-prepared): that is leakage, not external validation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cxrdist.data.datasets import CombinedManifest, DatasetEntry, combine, dataset_name
from cxrdist.data.location import Location, display, shard_root
from cxrdist.data.manifest import Manifest, SplitInfo
from cxrdist.data.datasets import load_manifest
from cxrdist.data.stream import read_shards
from cxrdist.errors import UserError
from cxrdist.labels.harmonise import harmonised_name

ALL_SPLIT = "all"


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
