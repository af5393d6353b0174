"""manifest.json: the one description of a prepared shard directory that every reader trusts and checks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cxrdist.atomic import atomic_write_text
from cxrdist.errors import UserError
from cxrdist.layout import TEST_SPLIT, fold_name  # noqa: F401 - re-exported: data.manifest names its splits

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


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
    format_version: int = FORMAT_VERSION
    created_by: str = ""

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


def write_manifest(root: Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST_NAME
    atomic_write_text(path, manifest.to_json())
    return path


def load_manifest(root: Path) -> Manifest:
    """Load and sanity-check `root/manifest.json`; a directory without one is incomplete and refused."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise UserError(f"{root}: no such shard directory (run `cxrdist prepare` first)")
    if not path.is_file():
        raise UserError(f"{root}: no {MANIFEST_NAME}, so the shards are incomplete (re-run `cxrdist prepare`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format version {version!r}, this cxrdist reads version {FORMAT_VERSION}")
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as err:
        raise UserError(f"{path}: malformed manifest ({err})") from None
    for shard in manifest.shards(list(manifest.splits)):
        if not (root / shard.file).is_file():
            raise UserError(f"{root / shard.file}: shard listed in the manifest is missing")
    return manifest
