"""fingerprints.npz: every stored image's perceptual fingerprint (data/ingest/fingerprint.py), written by prepare next to
manifest.json, which records its sha256; readers check it. A dataset prepared before fingerprints were stored has
them computed from its shards (every image decoded once per command, said)."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrdist.atomic import atomic_write_bytes
from cxrdist.data.ingest.fingerprint import METHOD, WORDS, fingerprint
from cxrdist.data.location import Location, ShardReadFailed, display, join, open_shard
from cxrdist.data.manifest import Manifest
from cxrdist.errors import UserError
from cxrdist.log import get_logger

FINGERPRINTS_NAME = "fingerprints.npz"
COLUMNS = ("key", "split", "patient", "path")
MAX_BYTES = 1 << 30
LOG = get_logger("fingerprints")


@dataclass
class FingerprintTable:
    """One row per stored image: its key, split, patient and path (as the shard json has them), and its fingerprint."""

    key: np.ndarray
    split: np.ndarray
    patient: np.ndarray
    path: np.ndarray
    prints: np.ndarray  # (N, WORDS) uint64

    def __len__(self) -> int:
        return len(self.key)

    def take(self, rows: np.ndarray) -> FingerprintTable:
        return FingerprintTable(*(getattr(self, name)[rows] for name in (*COLUMNS, "prints")))


def write_fingerprints(root: Path, table: FingerprintTable) -> dict:
    """Write root/fingerprints.npz; returns what the manifest records of it."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, prints=table.prints, **{name: np.asarray(getattr(table, name), dtype=str) for name in COLUMNS})
    data = buffer.getvalue()
    atomic_write_bytes(Path(root) / FINGERPRINTS_NAME, data)
    return {"file": FINGERPRINTS_NAME, "sha256": hashlib.sha256(data).hexdigest(), "count": len(table), "method": METHOD}


def read_fingerprints(root: Location, manifest: Manifest) -> FingerprintTable:
    """The dataset's fingerprints: its fingerprints.npz checked against the manifest, or (prepared before they were stored,
    or with another method) computed from its shards."""
    recorded = getattr(manifest, "fingerprints", None) or {}
    if recorded.get("method") != METHOD:
        return fingerprints_from_shards(root, manifest)
    location = join(root, recorded["file"])
    try:
        with open_shard(location) as handle:
            data = handle.read(MAX_BYTES + 1)
    except (FileNotFoundError, ShardReadFailed) as err:
        raise UserError(f"{display(location)}: cannot read the fingerprints its manifest lists ({err}); re-run `cxrdist prepare`") from None
    if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        raise UserError(f"{display(location)}: sha256 differs from the manifest (file changed or corrupt); re-run `cxrdist prepare`")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        table = FingerprintTable(*(arrays[name] for name in (*COLUMNS, "prints")))
    if len(table) != recorded["count"] or table.prints.shape != (len(table), WORDS):
        raise UserError(f"{display(location)}: {len(table)} fingerprints, the manifest says {recorded['count']}; re-run `cxrdist prepare`")
    return table


def fingerprints_from_shards(root: Location, manifest: Manifest) -> FingerprintTable:
    """Decode every stored image once and fingerprint it (datasets prepared before fingerprints were stored)."""
    from cxrdist.data.ingest.images import decode_image
    from cxrdist.data.shards import read_shard

    total = sum(split.num_samples for split in manifest.splits.values())
    LOG.warning(f"note: {display(root)} was prepared without image fingerprints; computing them from its {total:,} stored images "
                "(re-run `cxrdist prepare` to store them once)")
    rows, prints = [], []
    for name, split in manifest.splits.items():
        for shard in split.shards:
            for sample in read_shard(join(root, shard.file), shard):
                meta = json.loads(sample.meta or b"{}")
                rows.append((sample.key, name, str(meta.get("patient", "")), str(meta.get("path", ""))))
                prints.append(fingerprint(decode_image(sample.image)))
    columns = [np.array([row[i] for row in rows], dtype=str) for i in range(len(COLUMNS))]
    return FingerprintTable(*columns, np.array(prints, dtype=np.uint64).reshape(len(rows), WORDS))
