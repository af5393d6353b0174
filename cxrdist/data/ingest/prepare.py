"""`cxrdist prepare`: label table + images -> patient-grouped MIS folds -> WebDataset shards + manifest."""

from __future__ import annotations

import math
import shutil
import signal
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist import __version__
from cxrdist.atomic import (check_not_an_input, check_writable_dir, check_writable_file, remove_stale_staging, replace_directory,
                            staging_directory)
from cxrdist.data.ingest import folds as folds_lib
from cxrdist.data.ingest.attribute_table import AttributeRequest, attribute_values, build_request, check_names
from cxrdist.data.attributes import AttributeSpec, sample_attributes, spec_of
from cxrdist.data.ingest.images import MISSING_FILE
from cxrdist.data.manifest import MANIFEST_NAME, Manifest, SplitInfo, write_manifest
from cxrdist.data.ingest.fingerprint_store import FINGERPRINTS_NAME, FingerprintTable, write_fingerprints
from cxrdist.data.ingest.leakage import check_split_duplicates, duplicate_groups
from cxrdist.data.shards import EncodeJob, SampleSpec, ShardJob, encode_images, make_keys, plan_shards, run_jobs, run_parallel, shard_info
from cxrdist.data.ingest.sources import (ATTRIBUTE_PREFIX, MIMIC_METADATA_NAME, filter_views, in_test_list, load_records, read_test_list,
                                  resolve_paths, table_columns)
from cxrdist.errors import UserError
from cxrdist.layout import TEST_SPLIT, fold_name, is_fold
from cxrdist.log import progress
from cxrdist.text import count

MAX_LISTED = 5
ENCODE_CHUNK = 256  # images per job of the reading pass
POOL_DIR = ".images"  # in the staging directory: every image as stored, until the shards are packed


@dataclass
class PrepareOptions:
    source: str
    csv: Path
    images: Path | None
    out: Path | None
    folds: int = 5
    test_fraction: float = 0.0
    test_list: Path | None = None
    max_size: int = 512
    fmt: str = "jpg"
    quality: int = 95
    samples_per_shard: int = 1000
    views: str = "all"
    on_bad_image: str = "error"
    workers: int = 1
    seed: int = 0
    labels: str | None = None
    metadata: Path | None = None
    folds_only: Path | None = None
    folds_from: Path | None = None
    no_patient_grouping: bool = False
    allow_outside_images: bool = False
    progress: bool = True
    attributes: str | None = None  # --attributes NAME[=COLUMN],... (cxrdist/data/attributes.py)
    attributes_table: Path | None = None
    attributes_join: str = "patient"
    attributes_key: str | None = None
    age_bins: str | None = None


TYPED_PREFIX = "__typed_attribute__"  # records' column of an attribute's typed values, kept aligned when images are left out


def prepare(opts: PrepareOptions) -> Manifest | None:
    """Run the whole preparation; returns the manifest (None with --folds-only)."""
    if opts.folds_only is None and opts.out is not None:
        check_out(opts)
    if opts.folds_only is not None:
        check_writable_file(opts.folds_only, "--folds-only", example="folds.csv")
        check_not_an_input(opts.folds_only, input_files(opts).values(), "--folds-only")
    request = attribute_request(opts)
    records, labels = load_records(
        opts.source, opts.csv, labels=opts.labels, views="all", metadata_csv=opts.metadata, no_patient_grouping=opts.no_patient_grouping,
        attribute_columns=list(dict.fromkeys(request.from_csv.values())),
    )
    check_names(request.names, labels)
    notes = list(records.attrs.get("notes", []))
    records = filter_views(records, opts.views)
    columns, specs, attribute_notes = read_attributes(request, records, opts)  # before resolve_paths: a table joined by path names the CSV's paths
    records = records.assign(**{TYPED_PREFIX + name: pd.Series(values, index=records.index, dtype=object) for name, values in columns.items()})
    notes += attribute_notes
    if opts.source == "nih" and opts.images is not None and opts.folds_only is None:
        records = resolve_paths(records, opts.images)  # the official download spreads images over 12 folders
    labels, dropped = annotated_labels(records, labels, opts.csv)
    notes += dropped
    if opts.folds_only is not None:
        splits, said = assign(records, records[labels].to_numpy(dtype=float), opts)
        print_plan(records, labels, splits, notes + said)
        folds_lib.write_assignment(opts.folds_only, records["path"].tolist(), records["patient"].tolist(), splits)
        print(f"wrote the fold assignment to {opts.folds_only} (reuse it with --folds-from)")
        return None
    if opts.images is None or opts.out is None:
        raise UserError("prepare needs --images and --out (or --folds-only FILE to only compute the folds)")
    if opts.folds_from is not None:
        splits_from_file(records, opts.folds_from)  # a wrong fold file is said before the images are read
    missing = check_image_paths(records["path"], opts.images, opts.allow_outside_images, missing_ok=opts.on_bad_image == "skip")
    records.attrs["notes"] = notes
    return write_dataset(records, labels, missing, opts, specs)


def attribute_request(opts: PrepareOptions) -> AttributeRequest:
    return build_request(opts.source, opts.attributes, table_columns(opts.source, opts.csv, opts.metadata), opts.attributes_table,
                         opts.attributes_join, opts.attributes_key, opts.age_bins)


def read_attributes(request: AttributeRequest, records: pd.DataFrame, opts: PrepareOptions) -> tuple[dict[str, list], list, list[str]]:
    """The typed attributes of every record, their specs, and notes (what is unknown and why)."""
    raw = {name: records[ATTRIBUTE_PREFIX + column] for name, column in request.from_csv.items()}
    where = Path(opts.csv).name
    if opts.source == "mimic":
        where = Path(opts.metadata).name if opts.metadata else MIMIC_METADATA_NAME
    return attribute_values(request, records, raw, where)


def annotated_labels(records: pd.DataFrame, labels: list[str], csv: Path) -> tuple[list[str], list[str]]:
    """The labels the table annotates: a column blank in every row is not annotated (left out, said), never a negative
    for every image; a table that annotates no label at all is refused."""
    blank = [label for label in labels if records[label].isna().all()]
    if len(blank) == len(labels):
        raise UserError(f"{csv}: every label column is blank in every row ({', '.join(labels)}): the table annotates nothing, "
                        "and blanks would train as negatives for every finding; give a table with labels")
    if not blank:
        return labels, []
    return [label for label in labels if label not in blank], [
        f"{count(len(blank), 'label')} blank in every row of {csv} left out (not annotated, so never scored or trained as negatives): "
        + ", ".join(blank)]


def print_plan(records: pd.DataFrame, labels: list[str], splits: np.ndarray, notes: list[str]) -> dict:
    """Print the fold-balance table of exactly these records, and the notes; returns the balance."""
    raw = records[labels].to_numpy(dtype=float)
    balance = folds_lib.split_balance(splits, records["patient"].to_numpy(), folds_lib.positives_matrix(raw), labels)
    print(folds_lib.format_balance(balance))
    for note in notes:
        print(f"note: {note}")
    return balance


def assign(records: pd.DataFrame, raw: np.ndarray, opts: PrepareOptions, groups: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """(split per record, what to say about it); refused: a split no label can be scored on. `groups`: the patient groups
    folds keep together (default: patients)."""
    splits, said = assigned_splits(records, raw, opts, groups)
    folds_lib.check_scorable_splits(splits, raw)
    return splits, said


def assigned_splits(records: pd.DataFrame, raw: np.ndarray, opts: PrepareOptions, groups: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    if opts.folds_from is not None:
        splits = splits_from_file(records, opts.folds_from)
        opts.folds = sum(1 for s in set(splits) if is_fold(s))
        return splits, []
    groups = records["patient"].to_numpy() if groups is None else groups
    test_groups, said = None, []
    if opts.test_list is not None:
        listed = read_test_list(opts.test_list)
        in_list = in_test_list(records, listed).to_numpy()
        if not in_list.any():
            raise UserError(f"{opts.test_list}: none of its {len(listed)} entries matches an image path of the CSV")
        test_groups = set(groups[in_list])
        said = widened_test_list(records, in_list, np.isin(groups, list(test_groups)), opts.test_list)
    splits = folds_lib.assign_splits(
        list(groups),
        folds_lib.stratification_matrix(raw),
        opts.folds,
        seed=opts.seed,
        test_fraction=opts.test_fraction,
        test_patients=test_groups,
    )
    return splits, said


def widened_test_list(records: pd.DataFrame, listed: np.ndarray, in_test: np.ndarray, test_list: Path) -> list[str]:
    """A test list that names some of a patient's images takes the others along (a patient is never in two splits): said."""
    moved = in_test & ~listed
    if not moved.any():
        return []
    patients = records.loc[moved, "patient"].nunique()
    return [f"--test-list {test_list} names some but not all images of {count(patients, 'patient')}: their other "
            f"{count(int(moved.sum()), 'image')} moved to the test split too ({int(in_test.sum())} test images in all), "
            "so that no patient is in two splits"]


def splits_from_file(records: pd.DataFrame, path: Path) -> np.ndarray:
    table = folds_lib.read_assignment(path).set_index("path")
    missing = ~records["path"].isin(table.index)
    if missing.any():
        first = ", ".join(records.loc[missing, "path"].head(MAX_LISTED))
        raise UserError(f"{path}: {int(missing.sum())} images of the CSV have no split (first: {first})")
    splits = table.loc[records["path"], "split"].to_numpy()
    empty = sorted(set(filter(is_fold, table["split"])) - set(splits), key=lambda name: int(name.split("-")[1]))
    if empty:
        raise UserError(f"{path}: {', '.join(empty)} hold(s) none of the CSV's images (were they left out by --views or another CSV?); "
                        "every fold needs images: recompute the folds with --folds-only")
    per_patient = pd.Series(splits).groupby(records["patient"].to_numpy()).nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        raise UserError(f"{path}: {len(leaking)} patients are in more than one split (first: {leaking.index[0]})")
    return splits


def check_out(opts: PrepareOptions) -> None:
    """Refuse an --out that is a file, holds something prepare did not write, or overlaps an input:
    the new dataset replaces --out wholesale, and nothing else may ever be deleted."""
    out = Path(opts.out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {opts.out}: is a file, not a directory")
    check_writable_dir(out.parent, "--out", shown=opts.out)  # before the folds and the images are read, not when the first shard is written
    if opts.images is not None:
        images = Path(opts.images).resolve()
        if out == images or images in out.parents or out in images.parents:
            raise UserError(f"--out {opts.out} overlaps --images {opts.images}: write the shards to a directory outside the image tree")
    for what, path in input_files(opts).items():
        if out in Path(path).resolve().parents:
            raise UserError(f"{what} {path} is inside --out {opts.out}, which prepare replaces: move it out first")
    if out.is_dir() and any(out.iterdir()) and not is_prepared_dir(out):
        raise UserError(f"--out {opts.out}: not empty and not a directory written by `cxrdist prepare`; choose a new or empty directory")


def input_files(opts: PrepareOptions) -> dict[str, Path]:
    """The files prepare reads besides the images, by flag."""
    given = {"--csv": opts.csv, "--test-list": opts.test_list, "--folds-from": opts.folds_from, "--metadata": opts.metadata,
             "--attributes-table": opts.attributes_table}
    return {flag: Path(path) for flag, path in given.items() if path is not None}


def is_prepared_dir(path: Path) -> bool:
    """A directory holding only what prepare writes (manifest.json, fingerprints.npz, fold-K/, test/), manifest included."""
    names = {p.name for p in path.iterdir()}
    ours = {n for n in names if n in (MANIFEST_NAME, FINGERPRINTS_NAME, TEST_SPLIT) or is_fold(n)}
    return MANIFEST_NAME in names and ours == names


def check_image_paths(paths: pd.Series, images: Path, allow_outside: bool, missing_ok: bool) -> list[str]:
    """Every CSV path must name a file under --images (after resolving symlinks), and no file twice; returns the missing ones
    (refused unless `missing_ok`)."""
    root = Path(images)
    if not root.is_dir():
        raise UserError(f"--images {images}: no such directory")
    root = root.resolve()
    seen: dict[object, str] = {}
    missing = []
    for path in paths:
        target = (root / path).resolve()
        if not allow_outside and not target.is_relative_to(root):
            raise UserError(f"image path {path!r} leads outside --images {images} (pass --allow-outside-images to read it anyway)")
        identity, present = file_identity(target)
        if identity in seen:
            raise UserError(f"image paths {seen[identity]!r} and {path!r} name the same file {target}: one image cannot be two samples")
        seen[identity] = path
        if not present:
            missing.append(path)
    if missing and not missing_ok:
        raise UserError(
            f"{count(len(missing), 'image file')} listed in the CSV {'is' if len(missing) == 1 else 'are'} missing under {images} "
            f"(first: {', '.join(missing[:MAX_LISTED])}); "
            "--on-bad-image skip leaves them out"
        )
    return missing


def file_identity(path: Path) -> tuple[object, bool]:
    """(what tells files apart, whether it is a regular file): device and inode, so that hard links of one image
    are one file; the path itself for a missing one."""
    try:
        info = path.stat()
    except OSError:
        return path, False
    return (info.st_dev, info.st_ino), stat.S_ISREG(info.st_mode)


def sample_specs(records: pd.DataFrame, raw: np.ndarray, columns: dict[str, list]) -> list[SampleSpec]:
    specs = []
    for i, row in enumerate(records[["key", "path", "patient", "study", "view"]].itertuples(index=False)):
        labels = tuple(None if math.isnan(v) else int(v) for v in raw[i])
        specs.append(SampleSpec(row.key, row.path, str(row.patient), str(row.study), str(row.view), labels, sample_attributes(columns, i)))
    return specs


def split_names(splits: np.ndarray, num_folds: int) -> list[str]:
    names = [fold_name(k) for k in range(num_folds)]
    return names + ([TEST_SPLIT] if TEST_SPLIT in set(splits) else [])


def write_dataset(records: pd.DataFrame, labels: list[str], missing: list[str], opts: PrepareOptions,
                  attributes: list[AttributeSpec]) -> Manifest:
    """Read every image, then compute the folds of the images that could be read, then pack the shards; all in a hidden
    sibling directory swapped in only when complete: a failed or interrupted run leaves --out as it was (a previous
    dataset intact) and no partial shards anywhere. A symlinked --out is followed: the dataset it points at is the one
    replaced (the link stays, pointing at the new one)."""
    out = Path(opts.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in remove_stale_staging(out):
        print(f"removed {leftover}: the unfinished output of a prepare that was killed")
    staging = staging_directory(out)
    try:
        with sigterm_as_interrupt():
            staging.mkdir()
            manifest = write_shards(staging, records, labels, missing, opts, attributes)
            write_manifest(staging, manifest)
            replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the partial output is removed."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_images(pool: Path, records: pd.DataFrame, opts: PrepareOptions) -> tuple[pd.DataFrame, np.ndarray, list[tuple[str, str]]]:
    """Every image read, resized and encoded into `pool` (before any fold is computed): (the records whose image was
    written, their fingerprints, (path, why) of the images left out)."""
    pool.mkdir()
    pairs = list(zip(records["key"], records["path"]))
    jobs = [EncodeJob(str(opts.images), str(pool), tuple(pairs[i:i + ENCODE_CHUNK]), opts.fmt, opts.max_size, opts.quality,
                      opts.on_bad_image == "skip") for i in range(0, len(pairs), ENCODE_CHUNK)]
    with progress(len(pairs), "reading images", "img", enabled=opts.progress) as bar:
        results = run_parallel(encode_images, jobs, opts.workers, lambda r: bar.update(len(r.keys) + len(r.bad)))
    bad = [item for result in results for item in result.bad]
    written = ~records["path"].isin({path for path, _ in bad}).to_numpy()
    prints = np.concatenate([result.fingerprints for result in results])
    return records[written].reset_index(drop=True), prints, bad


def write_shards(out: Path, records: pd.DataFrame, labels: list[str], missing: list[str], opts: PrepareOptions,
                 attributes: list[AttributeSpec]) -> Manifest:
    notes = list(records.attrs.get("notes", []))
    records = records.assign(key=make_keys(records["path"].tolist()))
    present = ~records["path"].isin(set(missing)).to_numpy()
    pool = out / POOL_DIR
    records, prints, unreadable = read_images(pool, records[present].reset_index(drop=True), opts)
    bad = [(path, f"{Path(opts.images) / path}: {MISSING_FILE}") for path in missing] + unreadable
    if not len(records):
        raise UserError(f"none of the {count(len(bad), 'image')} listed in {opts.csv} could be read (first: {bad[0][1]})")
    if bad:
        notes.append(f"{count(len(bad), 'image')} of the table left out ({len(missing)} missing, {len(unreadable)} unreadable; "
                     f"listed in manifest.json): the folds, balance and shards are of the {count(len(records), 'image')} written")
    raw = records[labels].to_numpy(dtype=float)
    groups, said = duplicate_groups(records["patient"].to_numpy(), records["path"].to_numpy(), prints)
    splits, widened = assign(records, raw, opts, groups)
    if opts.folds_from is not None:
        check_split_duplicates(records["path"].to_numpy(), splits, prints, opts.folds_from)
    balance = print_plan(records, labels, splits, notes + said + widened)
    columns = {spec.name: records[TYPED_PREFIX + spec.name].tolist() for spec in attributes}
    specs = sample_specs(records, raw, columns)
    rng = np.random.default_rng(opts.seed)
    jobs_by_split: dict[str, list[ShardJob]] = {}
    for name in split_names(splits, opts.folds):
        split_dir = out / name
        split_dir.mkdir()
        members = np.flatnonzero(splits == name)
        members = members[rng.permutation(len(members))]  # each shard a random sample of its split
        jobs_by_split[name] = [
            ShardJob(str(opts.images), target, samples, opts.fmt, opts.max_size, opts.quality, False, pool=str(pool))
            for target, samples in plan_shards([specs[i] for i in members], split_dir, opts.samples_per_shard)
        ]
    all_jobs = [job for jobs in jobs_by_split.values() for job in jobs]
    with progress(len(specs), "writing shards", "img", enabled=opts.progress) as bar:
        results = run_jobs(all_jobs, opts.workers, lambda r: bar.update(len(r.keys)))
    shutil.rmtree(pool)
    table = FingerprintTable(records["key"].to_numpy(str), splits.astype(str), records["patient"].astype(str).to_numpy(str),
                             records["path"].to_numpy(str), prints)
    records.attrs["notes"] = notes + said + widened
    manifest = build_manifest(out, records, raw, labels, splits, opts, jobs_by_split, results, balance, bad)
    manifest.attributes = written_attributes(columns, attributes)
    manifest.fingerprints = write_fingerprints(out, table)
    return manifest


def build_manifest(out, records, raw, labels, splits, opts, jobs_by_split, results, balance, bad) -> Manifest:
    patients = records["patient"].to_numpy()
    split_infos, cursor = {}, 0
    for name, jobs in jobs_by_split.items():
        shard_results = results[cursor : cursor + len(jobs)]
        cursor += len(jobs)
        in_split = splits == name
        split_infos[name] = SplitInfo(
            num_samples=int(in_split.sum()),
            num_patients=int(len(set(patients[in_split]))),
            shards=[shard_info(r, out) for r in shard_results],
            positives={label: int((raw[in_split, j] == 1).sum()) for j, label in enumerate(labels)},
            uncertain={label: int((raw[in_split, j] == -1).sum()) for j, label in enumerate(labels)},
            prevalence=balance["splits"][name]["prevalence"] if name in balance["splits"] else {},
        )
    return Manifest(
        labels=labels,
        splits=split_infos,
        num_folds=opts.folds,
        seed=opts.seed,
        source={"name": opts.source, "csv": str(opts.csv), "images": str(opts.images), "views": opts.views,
                "notes": list(records.attrs.get("notes", []))},
        image={"format": opts.fmt, "max_size": opts.max_size, "quality": opts.quality, "mode": "L"},
        balance=balance,
        skipped_images={
            "count": len(bad), "missing": sum(1 for _, why in bad if why.endswith(MISSING_FILE)),
            "paths": [path for path, _ in bad], "reasons": [why for _, why in bad],
        },
        created_by=f"cxrdist {__version__}",
    )


def written_attributes(columns: dict[str, list], specs: list[AttributeSpec]) -> list[dict]:
    """The manifest's attribute specs, counted over the images written (not those left out)."""
    return [spec_of(s.name, s.kind, s.source, columns[s.name], s.bins).to_dict() for s in specs]
