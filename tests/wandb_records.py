"""Reading the transaction log (`run-ID.wandb`) that W&B writes for an offline run.

wandb 0.19+ writes it from its Go core and no longer ships a Python reader, so this is the small
reader of its format: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then LevelDB-log
records in 32 KiB blocks -- each chunk a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST),
a block tail shorter than a header is zero padding -- and every record a `wandb.proto` `Record`.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    out, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        if BLOCK - offset % BLOCK < HEADER:  # padding at the end of a block
            offset += BLOCK - offset % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def run_files(wandb_dir: Path) -> list[Path]:
    return sorted(Path(wandb_dir).rglob("offline-run-*/run-*.wandb"))


def summary(path: Path) -> dict:
    """What the run logged: history and summary keys merged, last value wins (JSON-decoded)."""
    values: dict = {}
    for record in records(path):
        items = record.history.item if record.HasField("history") else record.summary.update if record.HasField("summary") else []
        for item in items:
            key = item.key or "/".join(item.nested_key)
            values[key] = json.loads(item.value_json)
    return values


def history(path: Path) -> dict[str, list]:
    """key -> the values logged for it, in order."""
    series: dict[str, list] = defaultdict(list)
    for record in records(path):
        if record.HasField("history"):
            for item in record.history.item:
                series[item.key or "/".join(item.nested_key)].append(json.loads(item.value_json))
    return dict(series)


def run_info(path: Path) -> dict:
    for record in records(path):
        if record.HasField("run"):
            return {"id": record.run.run_id, "group": record.run.run_group, "name": record.run.display_name, "job_type": record.run.job_type}
    return {}


def artifacts(path: Path) -> list[dict]:
    """{"name", "type", "aliases", "files"} of every artifact the run logged."""
    found = []
    for record in records(path):
        if record.HasField("artifact"):
            art = record.artifact
            found.append({"name": art.name, "type": art.type, "aliases": list(art.aliases),
                          "files": sorted(entry.path for entry in art.manifest.contents)})
    return found
