"""manifest.json: the one description of a prepared shard directory that every reader trusts and checks."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cxrdist.atomic import atomic_write_text
from cxrdist.data.location import Location, ShardReadFailed, display, exists, is_url, join, read_text, shard_root
from cxrdist.errors import UserError
from cxrdist.layout import fold_name

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2: fingerprints (fingerprints.npz, data/ingest/fingerprint_store.py) and `attributes` (data/attributes.py, each
# sample's json "attributes"); a version-1 dataset reads as 2 without them: it trains and evaluates, with no subgroup audit
READABLE_VERSIONS = (1, 2)
MAX_MANIFEST_BYTES = 256 * 2**20  # far above any real manifest; an endless or wrong body stops here
EXISTENCE_CHECKS_IN_FLIGHT = 16  # parallel HEAD/stat requests when a manifest is read from a URL


@dataclass
class ShardInfo:
    file: str  # relative to the shard directory, e.g. "fold-0/shard-000000.tar"
    num_samples: int
    bytes: int
    sha256: str
    first_key: str = ""
    last_key: str = ""


@dataclass
class SplitInfo:
    num_samples: int
    num_patients: int
    shards: list[ShardInfo]
    positives: dict[str, int] = field(default_factory=dict)
    uncertain: dict[str, int] = field(default_factory=dict)
    prevalence: dict[str, float] = field(default_factory=dict)


@dataclass
class Manifest:
    labels: list[str]
    splits: dict[str, SplitInfo]
    num_folds: int
    seed: int
    source: dict
    image: dict  # {"format": "jpg"|"png", "max_size": int, "quality": int}
    balance: dict = field(default_factory=dict)
    skipped_images: dict = field(default_factory=lambda: {"count": 0, "paths": []})
    fingerprints: dict = field(default_factory=dict)  # {"file", "sha256", "count", "method"} of the sidecar, {} if none
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    attributes: list[dict] = field(default_factory=list)  # AttributeSpec.to_dict() of each attribute the samples carry

    @property
    def fold_names(self) -> list[str]:
        return [fold_name(k) for k in range(self.num_folds)]

    def train_splits(self, fold: int) -> list[str]:
        """The splits a model for `fold` trains on: every other fold."""
        self.check_fold(fold)
        return [name for name in self.fold_names if name != fold_name(fold)]

    def check_fold(self, fold: int) -> None:
        if not 0 <= fold < self.num_folds:
            raise UserError(f"fold {fold} does not exist: the manifest has folds 0..{self.num_folds - 1}")

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(f"split {name!r} is not in the manifest (it has: {', '.join(self.splits)})")
        return self.splits[name]

    def shards(self, names: list[str]) -> list[ShardInfo]:
        return [shard for name in names for shard in self.split(name).shards]

    def weighted_shards(self, names: list[str]) -> list[ShardInfo]:
        """The training shards of `names`, each as often per pass as its dataset's mixing weight says (data/datasets.py)."""
        return self.shards(names)

    def num_samples(self, names: list[str]) -> int:
        return sum(self.split(name).num_samples for name in names)

    def identity(self) -> dict:
        """What makes two shard directories the same dataset: label order, fold layout and every shard's content.

        Recorded in checkpoints and model cards; a run resumed or evaluated on shards with another identity is refused.
        """
        digest = hashlib.sha256()
        for name in sorted(self.splits):
            for shard in self.splits[name].shards:
                digest.update(f"{name}\t{shard.file}\t{shard.num_samples}\t{shard.sha256}\n".encode())
        return {"labels": list(self.labels), "num_folds": self.num_folds, "seed": self.seed, "content_sha256": digest.hexdigest()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        splits = {
            name: SplitInfo(**{**info, "shards": [ShardInfo(**s) for s in info["shards"]]})
            for name, info in data["splits"].items()
        }
        return cls(**{**data, "splits": splits})


def check_same_dataset(recorded: dict | None, manifest: Manifest, root: Location, what: str) -> None:
    """Refuse shards whose identity differs from the one `what` (a model, a checkpoint) recorded."""
    if recorded and recorded != manifest.identity():
        raise UserError(
            f"{what} was trained on another dataset than {display(root)} (labels, fold seed or shard contents differ): "
            "its test and validation splits would overlap its training images; pass the shards it was trained on"
        )


def write_manifest(root: Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST_NAME
    atomic_write_text(path, manifest.to_json())
    return path


def check_structure(manifest: Manifest, path: Path) -> None:
    """Types and the fold layout: a hand-edited or foreign manifest must not pass as a dataset."""
    if not isinstance(manifest.num_folds, int) or isinstance(manifest.num_folds, bool) or manifest.num_folds < 1:
        raise UserError(f"{path}: num_folds must be a positive integer, not {manifest.num_folds!r}")
    if not isinstance(manifest.labels, list) or not manifest.labels or not all(isinstance(x, str) for x in manifest.labels):
        raise UserError(f"{path}: labels must be a non-empty list of names")
    missing = [name for name in manifest.fold_names if name not in manifest.splits]
    if missing:
        raise UserError(f"{path}: split(s) {', '.join(missing)} missing (num_folds is {manifest.num_folds})")
    for name, split in manifest.splits.items():
        if not isinstance(split.num_samples, int) or not split.shards or not all(isinstance(s.num_samples, int) for s in split.shards):
            raise UserError(f"{path}: split {name!r} has no shards or non-integer sample counts")


def manifest_location(root: Location) -> Location:
    """Where a shard directory's (or URL's) manifest.json is."""
    return join(root, MANIFEST_NAME)


def has_manifest(root: Location) -> bool:
    """Whether `root` (a directory or a URL) holds a manifest.json; a URL that cannot be reached is a UserError."""
    return exists(manifest_location(root))


def load_one_manifest(root: Location) -> Manifest:
    """Load and sanity-check `root/manifest.json`; a directory (or URL) without one is incomplete and refused.
    (`data.shards` as a list of datasets: data/datasets.py's load_manifest combines several.)"""
    if is_url(root):
        return load_remote_manifest(root)
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise UserError(f"{root}: no such shard directory (run `cxrdist prepare` first)")
    if not path.is_file():
        raise UserError(f"{root}: no {MANIFEST_NAME}, so the shards are incomplete (re-run `cxrdist prepare`)")
    manifest = parse_manifest(read_text(path, MAX_MANIFEST_BYTES), str(path))
    for shard in manifest.shards(list(manifest.splits)):
        if not (root / shard.file).is_file():
            raise UserError(f"{root / shard.file}: shard listed in the manifest is missing")
    return manifest


def load_remote_manifest(url: str) -> Manifest:
    """The manifest under a URL; every shard it lists must be there (checked with parallel HEAD/stat requests)."""
    root = shard_root(url)
    location = manifest_location(root)
    try:
        text = read_text(location, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise UserError(f"{display(location)}: not found, so the shards there are incomplete (upload the whole `cxrdist prepare` output)") from None
    except ShardReadFailed as err:
        raise UserError(err.line) from None
    manifest = parse_manifest(text, display(location))
    files = [shard.file for shard in manifest.shards(list(manifest.splits))]
    present = checked_in_parallel(lambda file: exists(join(root, file)), files)
    missing = [file for file, ok in zip(files, present) if not ok]
    if missing:
        raise UserError(f"{display(join(root, missing[0]))}: shard listed in the manifest is missing ({len(missing)} of {len(files)} missing)")
    return manifest


def checked_in_parallel(check, items: list) -> list:
    """[check(item) ...], EXISTENCE_CHECKS_IN_FLIGHT at a time; the first failure is raised as soon as it comes and the
    checks not started yet are dropped (a failing server is not asked once per shard, one timeout after another)."""
    pool = ThreadPoolExecutor(EXISTENCE_CHECKS_IN_FLIGHT)
    try:
        futures = [pool.submit(check, item) for item in items]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def parse_manifest(text: str, path: str) -> Manifest:
    """A manifest from its JSON text; `path` names it in errors."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a manifest (a JSON {type(data).__name__}, expected an object)")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise UserError(f"{path}: format version {version!r}, this cxrdist reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None
    check_structure(manifest, path)
    return manifest
