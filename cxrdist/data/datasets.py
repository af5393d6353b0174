"""Several prepared datasets read as one: harmonised labels, namespaced samples, shared folds.

`data.shards` is one location (a directory or URL written by `cxrdist prepare`) or a list of them; a list entry is
a location or {location, name, weight, label_map}. With a list, fold K of the run is fold K of every dataset
(their fold counts must agree) and each sample is rewritten as it is read:
- its key, patient and path get the prefix "<dataset name>/", so two datasets with the same file names or
  patient numbers never collide in the stream, the gather, the bootstrap or a CSV;
- its labels are put in the model's order (cxrdist/labels/harmonise.py); a model label the dataset does not
  annotate gets NOT_ANNOTATED (cxrdist/labels/policy.py): masked in the loss and left out of every metric;
- its json gains "dataset": the dataset name (the `dataset` column of the prediction CSVs).
`weight` (default 1) is a dataset's relative sampling rate in training: its training shards are read
round(weight / smallest weight) times per pass. Evaluation reads every sample once, whatever the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxrdist.data.attributes import merged_specs
from cxrdist.data.location import Location, display, is_url, join, resolved, shard_root
from cxrdist.data.manifest import Manifest, ShardInfo, SplitInfo, load_one_manifest
from cxrdist.errors import UserError
from cxrdist.labels.harmonise import LabelVocabulary, harmonise, harmonised_name
from cxrdist.labels.names import label_list, near_duplicate
from cxrdist.labels.policy import NOT_ANNOTATED

NAMESPACE_SEPARATOR = "/"


@dataclass(frozen=True)
class DatasetEntry:
    """One prepared dataset of a run: where it is, what it is called, how often it is sampled, how its labels map."""

    name: str
    location: Location
    weight: float = 1.0
    label_map: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "location": resolved(self.location), "weight": self.weight, "label_map": dict(self.label_map)}


@dataclass
class DatasetShard(ShardInfo):
    """A shard of one dataset in a combined manifest: read from its own location, its samples rewritten."""

    location: Location = ""
    dataset: str = ""
    columns: tuple = ()  # for each of the dataset's labels, its index in the model's labels (None: dropped)
    num_model_labels: int = 0

    def samples(self) -> Iterator:
        from cxrdist.data.shards import RawSample, read_shard  # webdataset and torch: not for `cxrdist info`

        for raw in read_shard(self.location, self):
            yield RawSample(self.dataset + NAMESPACE_SEPARATOR + raw.key, raw.image, self.rewrite_meta(raw.meta))

    def rewrite_meta(self, meta: bytes | None) -> bytes | None:
        """Labels in the model's order, namespaced patient and path; unreadable json is left for the decoder to count."""
        try:
            data = json.loads(meta)
            labels = data["labels"]
            if len(labels) != len(self.columns):
                return meta
        except Exception:  # noqa: BLE001 - a corrupt sample stays corrupt; decode_sample counts it
            return meta
        model_labels = [NOT_ANNOTATED] * self.num_model_labels
        for value, index in zip(labels, self.columns):
            if index is not None:
                model_labels[index] = value
        for name in ("patient", "path"):
            if data.get(name):
                data[name] = self.dataset + NAMESPACE_SEPARATOR + str(data[name])
        return json.dumps({**data, "labels": model_labels, "dataset": self.dataset}).encode()


class CombinedManifest(Manifest):
    """Several datasets' manifests as one (built here, never written): split K = split K of every dataset."""

    members: dict[str, Manifest]
    entries: tuple[DatasetEntry, ...]
    vocabulary_given: bool  # the labels are a given vocabulary (data.vocabulary, a model's), not the members' union
    outside: dict[str, list[str]]  # dataset -> its labels the given vocabulary lacks (combine's skip_outside)

    def identity(self) -> dict:
        """The members' identities under their names, and the label mapping: what checkpoints and model cards record."""
        members = {entry.name: {**self.members[entry.name].identity(), "label_map": dict(entry.label_map)} for entry in self.entries}
        digest = hashlib.sha256(json.dumps(members, sort_keys=True).encode()).hexdigest()
        return {"labels": list(self.labels), "num_folds": self.num_folds, "seed": self.seed, "content_sha256": digest,
                "datasets": sorted(members)}

    def weighted_shards(self, names: list[str]) -> list[ShardInfo]:
        """The training shards with each dataset's repeated by its mixing weight."""
        smallest = min(entry.weight for entry in self.entries)
        copies = {entry.name: max(1, round(entry.weight / smallest)) for entry in self.entries}
        return [shard for shard in self.shards(names) for _ in range(copies[shard.dataset])]


def dataset_name(location: Location) -> str:
    """The default name of a dataset: the last part of its location (directory name, or URL path)."""
    text = display(location).rstrip("/") if is_url(location) else str(Path(location).resolve())
    return posixpath.basename(text.rstrip("/")) or text


def parse_entries(spec) -> tuple[DatasetEntry, ...]:
    """`data.shards` as a list: every entry a location or {location, name, weight, label_map}; see the module docstring."""
    entries = []
    for item in spec:
        if isinstance(item, DatasetEntry):
            entries.append(item)
            continue
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - {"location", "name", "weight", "label_map"})
            if unknown or "location" not in item:
                raise UserError(f"data.shards: an entry is a location or {{location, name, weight, label_map}}, got {dict(item)!r}")
            location, name = checked_location(item["location"]), checked_name(item.get("name"), item["location"])
            weight, label_map = item.get("weight", 1.0), checked_label_map(item.get("label_map"), name or location)
        else:
            location, name, weight, label_map = checked_location(item), None, 1.0, {}
        entries.append(DatasetEntry(str(name) if name else dataset_name(shard_root(location)), shard_root(location),
                                    check_weight(weight, location), label_map))
    check_entries(entries)
    return tuple(entries)


def checked_location(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, Path, int)) or not str(value).strip():  # int: a folder named 2024
        raise UserError(f"data.shards: a dataset's location is a directory or URL, got {value!r}")
    return str(value)


def checked_name(value, location) -> str | None:
    if value is not None and not isinstance(value, (str, int)):
        raise UserError(f"data.shards: the name of {location} is text, got {value!r}")
    return None if value is None else str(value)


def checked_label_map(value, dataset) -> dict[str, str | None]:
    """{the dataset's label: harmonised name, or null to drop it}; anything else (a string, a list, a number, a target that
    is not text) is refused here instead of failing later or becoming a label named "5"."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"data.shards: the label_map of {dataset} maps its label names to harmonised names "
                        f"({{Effusion: Pleural Effusion, Device: null}}), got {value!r}")
    for source, target in value.items():
        if target is not None and not isinstance(target, str):
            raise UserError(f"data.shards: the label_map of {dataset} maps {source!r} to {target!r}; a label is mapped to a name or null")
    return {str(source): target for source, target in value.items()}


def check_weight(weight, location: str) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"data.shards: the mixing weight of {location} must be a positive number, not {weight!r}")
    return value


def check_entries(entries: Sequence[DatasetEntry]) -> None:
    if not entries:
        raise UserError("data.shards: the list names no dataset")
    locations = [resolved(entry.location) for entry in entries]
    for location in locations:
        if locations.count(location) > 1:
            raise UserError(f"data.shards: {location} is listed twice")
    names = [entry.name for entry in entries]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"data.shards: two datasets are named {name!r}; give them distinct names ({{location: ..., name: ...}})")
        if NAMESPACE_SEPARATOR in name or not name:
            raise UserError(f"data.shards: dataset name {name!r} must be non-empty and without {NAMESPACE_SEPARATOR!r}")


def combine(entries: Sequence[DatasetEntry], vocabulary: Sequence[str] | None = None, skip_outside: bool = False) -> CombinedManifest:
    """One manifest over every entry's: the fold counts must agree and the labels harmonise (UserError otherwise);
    with `skip_outside`, labels `vocabulary` lacks are left out (an external dataset scored by a model)."""
    members = {entry.name: load_one_manifest(entry.location) for entry in entries}
    check_distinct_contents(members)
    if len(entries) > 1:
        check_distinct_images(entries, members)
    folds = {name: manifest.num_folds for name, manifest in members.items()}
    if len(set(folds.values())) > 1:
        raise UserError(f"data.shards: the datasets have different fold counts ({', '.join(f'{n}: {k}' for n, k in folds.items())}); "
                        "prepare them with the same --folds")
    vocab = harmonise({name: manifest.labels for name, manifest in members.items()},
                      {entry.name: entry.label_map for entry in entries}, vocabulary,
                      {name: source_name(manifest) for name, manifest in members.items()}, skip_outside)
    check_one_spelling_per_finding(vocab, members)
    splits: dict[str, SplitInfo] = {}
    for entry in entries:
        manifest = members[entry.name]
        columns = tuple(vocab.columns[entry.name])
        for split_name, split in manifest.splits.items():
            combined = splits.setdefault(split_name, SplitInfo(0, 0, []))
            combined.num_samples += split.num_samples
            combined.num_patients += split.num_patients
            combined.shards.extend(DatasetShard(**vars(shard), location=join(entry.location, shard.file), dataset=entry.name,
                                                columns=columns, num_model_labels=len(vocab.labels)) for shard in split.shards)
    for split_name, split in splits.items():
        pooled_counts(split, vocab.labels, [(members[e.name], vocab.columns[e.name]) for e in entries if split_name in members[e.name].splits],
                      split_name)
    first = members[entries[0].name]
    result = CombinedManifest(labels=vocab.labels, splits=splits, num_folds=first.num_folds, seed=first.seed,
                              source={"datasets": [entry.to_dict() for entry in entries]}, image=dict(first.image),
                              attributes=merged_specs({name: manifest.attributes for name, manifest in members.items()}))
    result.members, result.entries = members, tuple(entries)
    result.vocabulary_given, result.outside = vocabulary is not None, vocab.outside
    return result


def pooled_counts(split: SplitInfo, labels: list[str], members: list[tuple[Manifest, list]], name: str) -> None:
    """Positives, uncertain and prevalence of each model label over the datasets that annotate it (a dataset that does not
    annotate a label adds nothing to its counts nor to its images)."""
    annotated = dict.fromkeys(labels, 0)
    for manifest, columns in members:
        own = manifest.splits[name]
        for label, index in zip(manifest.labels, columns):
            if index is None:
                continue
            target = labels[index]
            split.positives[target] = split.positives.get(target, 0) + int(own.positives.get(label, 0))
            split.uncertain[target] = split.uncertain.get(target, 0) + int(own.uncertain.get(label, 0))
            annotated[target] += own.num_samples
    split.prevalence = {label: split.positives.get(label, 0) / n for label, n in annotated.items() if n}


def source_name(manifest: Manifest) -> str | None:
    """The --source a dataset was prepared with (chexpert, nih, mimic, csv), as its manifest records it."""
    source = manifest.source if isinstance(manifest.source, dict) else {}
    return source.get("name") if isinstance(source.get("name"), str) else None


def check_one_spelling_per_finding(vocab, members: Mapping[str, Manifest]) -> None:
    """Two datasets' names for one finding that harmonise to two spellings ("Pleural Effusion", "pleural effusion")."""
    pair = near_duplicate(vocab.labels)
    if pair is None:
        return

    def origin(label: str) -> str:
        index = vocab.labels.index(label)
        found = [f"{name}'s {source!r}" for name, manifest in members.items()
                 for source, column in zip(manifest.labels, vocab.columns[name]) if column == index]
        return ", ".join(found) or "data.vocabulary"

    raise UserError(f"data.shards: labels {pair[0]!r} (from {origin(pair[0])}) and {pair[1]!r} (from {origin(pair[1])}) differ only in "
                    "case, spaces or underscores: one finding would train as two labels; map them onto one spelling with a label_map")


def check_distinct_contents(members: Mapping[str, Manifest]) -> None:
    seen: dict[str, str] = {}
    for name, manifest in members.items():
        content = manifest.identity()["content_sha256"]
        if content in seen:
            raise UserError(f"data.shards: datasets {seen[content]} and {name} hold the same shards (a dataset listed twice)")
        seen[content] = name


def check_distinct_images(entries: Sequence[DatasetEntry], members: Mapping[str, Manifest]) -> None:
    """No two datasets of one run hold the same radiographs (another prepare of the same images: other folds) or, copies
    of one public source, the same patients: fold K of one would train on the other's fold-K validation images."""
    from cxrdist.data.ingest.fingerprint_store import read_fingerprints
    from cxrdist.data.ingest.leakage import overlap

    tables = {entry.name: read_fingerprints(entry.location, members[entry.name]) for entry in entries}
    names = [entry.name for entry in entries]
    for k, first in enumerate(names):
        for second in names[k + 1:]:
            shared = overlap(tables[first], members[first].source.get("name"), tables[second], members[second].source.get("name"))
            if shared:
                raise UserError(f"data.shards: datasets {first} and {second} are not distinct: {second} has {shared.describe()}; "
                                "one would train on the other's validation and test images; list one copy, or prepare one without them")


def is_dataset_list(spec) -> bool:
    return not isinstance(spec, (str, Path)) and isinstance(spec, Sequence | _list_config())


def _list_config() -> type:
    from omegaconf import ListConfig

    return ListConfig


def load_manifest(spec) -> Manifest:
    """The manifest of `data.shards`: one dataset's, or several datasets' combined."""
    return open_datasets(spec)[1]


def open_datasets(spec, vocabulary: Sequence[str] | None = None) -> tuple[Location | tuple[DatasetEntry, ...], Manifest]:
    """(root, manifest) for `data.shards`: a single location as it always was, a list as one CombinedManifest whose
    root is the tuple of its entries."""
    if vocabulary is not None:
        vocabulary = label_list(vocabulary, "data.vocabulary")
    if not is_dataset_list(spec):
        if vocabulary is not None:  # never applied to one location: the model would silently have the manifest's labels
            raise UserError("data.vocabulary applies to a list of datasets; write data.shards as a one-entry list "
                            "([{location: ..., label_map: ...}]) to map one dataset's labels onto it")
        if isinstance(spec, Mapping):
            raise UserError(f"data.shards: one location or a list of datasets, got one mapping {dict(spec)!r}: put it in a list")
        root = shard_root(checked_location(spec))
        return root, load_one_manifest(root)
    entries = parse_entries(spec)
    return entries, combine(entries, vocabulary)


def root_dataset_name(root) -> str:
    """The dataset name of a single location (the `dataset` column when samples do not carry one)."""
    return "" if isinstance(root, tuple) else dataset_name(root)


def recorded_root(shards) -> Location | tuple[DatasetEntry, ...]:
    """The root a model card's `shards` names: one location, or (several datasets) the tuple of their entries."""
    return parse_entries(shards) if is_dataset_list(shards) else shard_root(resolved(shards))


def load_recorded(root, labels: Sequence[str]) -> Manifest:
    """The manifest of the data a model was trained on (`root` from recorded_root), in the model's label order: several
    datasets are combined onto the model's labels (its vocabulary, whether the union or data.vocabulary)."""
    return combine(root, vocabulary=list(labels)) if isinstance(root, tuple) else load_one_manifest(root)


def label_vocabulary(root, manifest: Manifest) -> LabelVocabulary:
    """What a model card records of the labels it trains on (cxrdist/labels/harmonise.py): one dataset's labels with their
    harmonised names, or several datasets' vocabulary (the union, or data.vocabulary)."""
    if isinstance(manifest, CombinedManifest):
        datasets = {entry.name: {"source": source_name(manifest.members[entry.name]), "labels": list(manifest.members[entry.name].labels),
                                 "label_map": dict(entry.label_map)} for entry in manifest.entries}
        return LabelVocabulary("data.vocabulary" if manifest.vocabulary_given else "datasets", list(manifest.labels), datasets)
    source = source_name(manifest)
    names = [harmonised_name(label, {}, source) for label in manifest.labels]
    # two columns of one table that name one finding (both spellings) keep their own names: trained apart, matched apart
    names = [label if names.count(name) > 1 else name for label, name in zip(manifest.labels, names)]
    return LabelVocabulary("dataset", names,
                           {dataset_name(root): {"source": source, "labels": list(manifest.labels), "label_map": {}}})
