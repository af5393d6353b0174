"""Reading manifest.json from a URL (the local case stays in manifest.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from cxrdist.data.location import ShardReadFailed, display, exists, join, read_text, shard_root
from cxrdist.data.manifest import MANIFEST_NAME, Manifest, parse_manifest
from cxrdist.errors import UserError

EXISTENCE_CHECKS_IN_FLIGHT = 16


def load_remote_manifest(url: str) -> Manifest:
    """The manifest under a URL; every shard it lists must be there (checked with parallel HEAD/stat requests)."""
    root = shard_root(url)
    location = join(root, MANIFEST_NAME)
    try:
        text = read_text(location)
    except FileNotFoundError:
        raise UserError(f"{display(location)}: not found, so the shards there are incomplete (upload the whole `cxrdist prepare` output)") from None
    except ShardReadFailed as err:
        raise UserError(err.line) from None
    manifest = parse_manifest(text, display(location))
    files = [shard.file for shard in manifest.shards(list(manifest.splits))]
    with ThreadPoolExecutor(EXISTENCE_CHECKS_IN_FLIGHT) as pool:
        present = list(pool.map(lambda file: exists(join(root, file)), files))
    missing = [file for file, ok in zip(files, present) if not ok]
    if missing:
        raise UserError(f"{display(join(root, missing[0]))}: shard listed in the manifest is missing ({len(missing)} of {len(files)} missing)")
    return manifest
