"""Dataset label tables (generic CSV, CheXpert, NIH ChestX-ray14, MIMIC-CXR-JPG) -> one records table.

A records table is a pandas DataFrame with the columns, in order:
  path     str, relative to the images root (forward slashes)
  patient  str (folds are grouped by it)
  study    str, "" if unknown
  view     str: "PA", "AP", "LATERAL", "LL", or "" (unknown / anything else)
  <label>  one float64 column per label: 1.0 positive, 0.0 negative, -1.0 uncertain, NaN blank
  then, for each column asked for with `attribute_columns`, ATTRIBUTE_PREFIX + column: its text as written
  (cxrdist/data/attributes.py types it)

Images root per source (what `prepare --images` should point at):
  csv       the folder the CSV's `path` values are relative to
  chexpert  the folder that CONTAINS `CheXpert-v1.0-small/` (paths are kept as in train.csv)
  nih       the folder holding the PNGs, flat or in the official `images_0NN/images/` folders
            (call `resolve_paths` to map the flat names onto the nested layout)
  mimic     the MIMIC-CXR-JPG root, the folder that contains `files/`

Error messages name CSV lines as in a text editor: line 1 is the header, line 2 the first data row.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from cxrdist.errors import UserError
from cxrdist.labels import CHEXPERT_LABELS, NIH_LABELS, resolve_labels

log = logging.getLogger(__name__)

SOURCES = ("csv", "chexpert", "nih", "mimic")
RECORD_COLUMNS = ("path", "patient", "study", "view")
KNOWN_VIEWS = ("PA", "AP", "LATERAL", "LL")
FRONTAL_VIEWS = {"PA", "AP"}
VIEW_CHOICES = ("all", "frontal")
MIMIC_METADATA_NAME = "mimic-cxr-2.0.0-metadata.csv"
NIH_NO_FINDING = "No Finding"
ATTRIBUTE_PREFIX = "attribute column:"

_VIEW_ALIASES = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LAT": "LATERAL", "LL": "LL"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_HEADER_LINES = 1


def load_records(
    source: str,
    csv: Path,
    labels: str | None = None,
    views: str = "all",
    metadata_csv: Path | None = None,
    no_patient_grouping: bool = False,
    attribute_columns: Sequence[str] = (),
) -> tuple[pd.DataFrame, list[str]]:
    """Read `csv` as `source` and return (records, label names); see the module docstring.

    `labels` is the --labels spec (None: the source's default vocabulary). `metadata_csv` is
    only for mimic (default: mimic-cxr-2.0.0-metadata.csv next to `csv`). For mimic, the number
    of images dropped because their study has no labels row is in `records.attrs["notes"]`.
    A generic CSV without a `patient` column is refused unless `no_patient_grouping` (then every
    image is its own patient, noted in `records.attrs["notes"]`). Paths are normalised
    (`./a.png` and `a.png` are one path) before the duplicate check. `attribute_columns` (of the CSV; for mimic, of
    its metadata CSV) are kept as text after the labels, named ATTRIBUTE_PREFIX + column.
    """
    if source not in SOURCES:
        raise UserError(f"--source {source!r}: expected one of {', '.join(SOURCES)}")
    if views not in VIEW_CHOICES:
        raise UserError(f"--views {views!r}: expected one of {', '.join(VIEW_CHOICES)}")
    if metadata_csv is not None and source != "mimic":
        raise UserError(f"--metadata is only used with --source mimic, not --source {source}")
    csv = Path(csv)
    extra = tuple(attribute_columns)
    if source == "csv":
        records, names = _load_generic(csv, labels, no_patient_grouping, extra)
    elif source == "chexpert":
        records, names = _load_chexpert(csv, labels, extra)
    elif source == "nih":
        records, names = _load_nih(csv, labels, extra)
    else:
        records, names = _load_mimic(csv, labels, metadata_csv, extra)
    if records.empty:
        raise UserError(f"{csv}: no image rows")
    records["path"] = records["path"].map(posixpath.normpath)
    _check_unique_paths(records, csv)
    return filter_views(records, views), names


def table_columns(source: str, csv: Path, metadata_csv: Path | None = None) -> list[str]:
    """The column names of the table whose columns `attribute_columns` may name (MIMIC: its metadata CSV)."""
    path = Path(csv)
    if source == "mimic":
        path = Path(metadata_csv) if metadata_csv is not None else path.parent / MIMIC_METADATA_NAME
    if not path.is_file():
        return []
    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0, dtype=str).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
        return []


def filter_views(df: pd.DataFrame, views: str) -> pd.DataFrame:
    """'all': every row; 'frontal': PA and AP only (an empty result is a UserError)."""
    if views == "all":
        return df.reset_index(drop=True)
    if views != "frontal":
        raise UserError(f"--views {views!r}: expected one of {', '.join(VIEW_CHOICES)}")
    kept = df[df["view"].isin(FRONTAL_VIEWS)].reset_index(drop=True)
    if kept.empty:
        found = ", ".join(f"{v or '(blank)'}: {n}" for v, n in df["view"].value_counts().items())
        raise UserError(f"no images left after --views frontal (views found: {found or 'none'})")
    return kept


def read_test_list(path: Path) -> set[str]:
    """A test list such as NIH's test_list.txt: one image path or file name per line.

    Blank lines and lines starting with '#' are ignored.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--test-list {path}: cannot read ({e.__class__.__name__}: {e})") from e
    entries = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    if not entries:
        raise UserError(f"--test-list {path}: no image names in the file")
    return entries


def in_test_list(df: pd.DataFrame, entries: Iterable[str]) -> pd.Series:
    """Boolean mask of the rows whose path, or file name, is one of `entries`."""
    entries = set(entries)
    names = df["path"].map(lambda p: PurePosixPath(p).name)
    return df["path"].isin(entries) | names.isin(entries)


def resolve_paths(df: pd.DataFrame, images_root: Path) -> pd.DataFrame:
    """Map paths that are not under `images_root` onto files found there by file name.

    The root is indexed once (e.g. NIH's official `images_001/images/00000001_000.png` layout
    for a CSV that names `00000001_000.png`). Paths found neither way are left as they are (the
    image reader reports them); a file name found in two folders is a UserError.
    """
    root = Path(images_root)
    if not root.is_dir():
        raise UserError(f"--images {root}: not a directory")
    present, by_name = _index_images(root)
    resolved: list[str] = []
    moved = 0
    for path in df["path"].tolist():
        if path in present:
            resolved.append(path)
            continue
        candidates = by_name.get(PurePosixPath(path).name, [])
        if len(candidates) > 1:
            raise UserError(
                f"--images {root}: {path!r} not found, and its file name is in {len(candidates)} "
                f"folders ({', '.join(candidates[:3])}); cannot tell which one is meant"
            )
        if candidates:
            moved += 1
        resolved.append(candidates[0] if candidates else path)
    if moved:
        log.info("found %d of %d images by file name under %s", moved, len(df), root)
    out = df.copy()
    out["path"] = resolved
    return out


def _index_images(root: Path) -> tuple[set[str], dict[str, list[str]]]:
    present: set[str] = set()
    by_name: dict[str, list[str]] = {}
    for folder, _, files in os.walk(root):
        relative_folder = Path(folder).relative_to(root).as_posix()
        for name in files:
            if not name.lower().endswith(_IMAGE_SUFFIXES):
                continue
            relative = name if relative_folder == "." else f"{relative_folder}/{name}"
            present.add(relative)
            by_name.setdefault(name, []).append(relative)
    return present, by_name


# ---------------------------------------------------------------- reading and checking tables


def _read_table(path: Path, what: str = "label CSV") -> pd.DataFrame:
    """A CSV as strings (blank = ""), keeping line numbers: row index i is file line i + 2."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        table = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            index_col=False,
            skip_blank_lines=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot parse as CSV ({' '.join(str(e).split())})") from e
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty or len(table.columns) == 0:
        return table
    maybe_blank = table.index[table.iloc[:, 0] == ""]
    blank_rows = maybe_blank[(table.loc[maybe_blank] == "").all(axis=1).to_numpy()]
    return table.drop(index=blank_rows)


def _line(table: pd.DataFrame, position: int) -> int:
    return int(table.index[position]) + _HEADER_LINES + 1


def _require_columns(table: pd.DataFrame, needed: Iterable[str], path: Path) -> None:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        found = ", ".join(repr(c) for c in table.columns)
        raise UserError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; columns found: {found}"
        )


def _stripped(table: pd.DataFrame, column: str) -> pd.Series:
    return table[column].astype(str).str.strip()


MISSING_MARKERS = {"", "nan", "na", "n/a", "none", "null", "<na>"}  # what spreadsheets and pandas write for an empty cell


def _require_nonblank(values: pd.Series, table: pd.DataFrame, column: str, path: Path) -> None:
    """No empty cell, nor a written-out missing value ("NaN", "None", ...): those rows would all share one id."""
    blank = np.flatnonzero(values.str.lower().isin(MISSING_MARKERS).to_numpy())
    if blank.size:
        raise UserError(f"{path}, line {_line(table, int(blank[0]))}: blank {column!r} ({values.iloc[blank[0]]!r}; {blank.size} such rows)")


def _label_value(text: str) -> float | None:
    """'' -> NaN; a number equal to 1, 0 or -1 -> that float; anything else -> None (invalid)."""
    if text == "":
        return np.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value in (1.0, 0.0, -1.0) else None


def _parse_labels(table: pd.DataFrame, names: list[str], path: Path) -> pd.DataFrame:
    """Raw label columns ('1', '1.0', '0', '-1', '' ...) -> float64 1/0/-1/NaN, checked."""
    parsed = {}
    for name in names:
        codes, texts = pd.factorize(table[name].astype(str))  # a handful of distinct texts
        values = np.array([_label_value(text.strip()) for text in texts], dtype=object)
        invalid = np.array([v is None for v in values], dtype=bool)
        if invalid.any():
            bad = np.flatnonzero(invalid[codes])
            first = int(bad[0])
            more = f" ({bad.size - 1} more bad values in this column)" if bad.size > 1 else ""
            raise UserError(
                f"{path}, line {_line(table, first)}, column {name!r}: bad label value "
                f"{texts[codes[first]].strip()!r}; expected 1, 0, -1 or blank{more}"
            )
        parsed[name] = values.astype(np.float64)[codes]
    return pd.DataFrame(parsed, index=table.index)


def _check_label_names(names: list[str]) -> None:
    clashing = [n for n in names if n in RECORD_COLUMNS]
    if clashing:
        raise UserError(f"--labels: {', '.join(clashing)} cannot be label names (reserved record columns)")


def _normalize_views(raw: pd.Series, path: Path, warn: bool) -> pd.Series:
    upper = raw.astype(str).str.strip().str.upper()
    views = upper.map(_VIEW_ALIASES).fillna("")
    unknown = upper[(views == "") & (upper != "")]
    if len(unknown):
        examples = ", ".join(repr(v) for v in unknown.value_counts().index[:5])
        message = "%s: %d images have a view other than PA/AP/LATERAL/LL (%s); their view is unknown"
        (log.warning if warn else log.info)(message, path, len(unknown), examples)
    return views.astype(str)


def _records(table: pd.DataFrame, path, patient, study, view, labels: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    columns = {"path": path, "patient": patient, "study": study, "view": view}
    frame = pd.DataFrame({k: pd.Series(v, index=table.index).astype(str) for k, v in columns.items()})
    kept = pd.DataFrame({ATTRIBUTE_PREFIX + c: table[c].astype(str) for c in extra}, index=table.index)
    return pd.concat([frame, labels, kept], axis=1).reset_index(drop=True)


def _check_unique_paths(records: pd.DataFrame, csv: Path) -> None:
    repeated = records["path"][records["path"].duplicated()].unique()
    if len(repeated):
        examples = ", ".join(repr(p) for p in repeated[:3])
        raise UserError(f"{csv}: {len(repeated)} image path(s) appear more than once, e.g. {examples}")


# ---------------------------------------------------------------- the sources


def _load_generic(csv: Path, spec: str | None, no_patient_grouping: bool = False, extra: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    table = _read_table(csv)
    if spec is None or spec == "":
        if not set(CHEXPERT_LABELS) <= set(table.columns):
            columns = ", ".join(repr(c) for c in table.columns)
            raise UserError(
                f"{csv}: no --labels given and the CSV lacks the CheXpert 14 label columns; pass "
                f"--labels chexpert, nih, or a comma-separated list of label columns (columns found: {columns})"
            )
    names = resolve_labels(spec, CHEXPERT_LABELS)
    _check_label_names(names)
    _require_columns(table, ["path", *names, *extra], csv)
    path = _stripped(table, "path")
    _require_nonblank(path, table, "path", csv)
    if "patient" in table.columns:
        patient = _stripped(table, "patient")
        _require_nonblank(patient, table, "patient", csv)
    elif no_patient_grouping:
        patient = path.map(posixpath.normpath)
    else:
        raise UserError(
            f"{csv}: no 'patient' column, so one patient's images could land in several folds; "
            "add the column, or pass --no-patient-grouping to treat every image as its own patient"
        )
    study = _stripped(table, "study") if "study" in table.columns else ""
    view = _normalize_views(table["view"], csv, warn=True) if "view" in table.columns else ""
    records = _records(table, path, patient, study, view, _parse_labels(table, names, csv), extra)
    if "patient" not in table.columns:
        records.attrs["notes"] = [
            "no patient grouping (--no-patient-grouping): every image is its own patient, so a patient's images may sit in several folds"
        ]
    return records, names


_CHEXPERT_PATH = re.compile(r"(?:^|/)(patient\d+)/(study\d+)/[^/]+$")


def _load_chexpert(csv: Path, spec: str | None, extra: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    names = resolve_labels(spec, CHEXPERT_LABELS)
    _check_label_names(names)
    table = _read_table(csv, "CheXpert CSV")
    _require_columns(table, ["Path", "Frontal/Lateral", "AP/PA", *names, *extra], csv)
    path = _stripped(table, "Path")
    matches = [_CHEXPERT_PATH.search(p) for p in path.tolist()]
    if not all(matches):
        first = next(i for i, m in enumerate(matches) if m is None)
        raise UserError(
            f"{csv}, line {_line(table, first)}: Path {path.iloc[first]!r} is not like "
            f"'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg'"
        )
    patient = [m[1] for m in matches]
    study = [f"{m[1]}/{m[2]}" for m in matches]
    side = _stripped(table, "Frontal/Lateral").str.lower()
    frontal_view = _normalize_views(table["AP/PA"].where(side == "frontal", ""), csv, warn=False)
    view = frontal_view.where(side == "frontal", np.where(side == "lateral", "LATERAL", ""))
    return _records(table, path, patient, study, view, _parse_labels(table, names, csv), extra), names


_NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"]


def _load_nih(csv: Path, spec: str | None, extra: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    names = resolve_labels(spec, NIH_LABELS)
    known = [*NIH_LABELS, NIH_NO_FINDING]
    not_nih = [n for n in names if n not in known]
    if not_nih:
        raise UserError(
            f"--labels: {', '.join(repr(n) for n in not_nih)} not in NIH ChestX-ray14's findings "
            f"({', '.join(known)})"
        )
    table = _read_table(csv, "NIH CSV")
    _require_columns(table, [*_NIH_COLUMNS, *extra], csv)
    findings = _stripped(table, "Finding Labels").str.replace(r"\s*\|\s*", "|", regex=True)
    _require_nonblank(findings, table, "Finding Labels", csv)
    present = findings.str.get_dummies(sep="|")
    unknown = [c for c in present.columns if c not in known]
    if unknown:
        first = int(np.flatnonzero(present[unknown].any(axis=1).to_numpy())[0])
        raise UserError(
            f"{csv}, line {_line(table, first)}: unknown finding(s) {', '.join(repr(u) for u in unknown)} "
            f"in 'Finding Labels' {findings.iloc[first]!r}; expected names from: {', '.join(known)}"
        )
    labels = pd.DataFrame(
        {n: present[n].astype("float64") if n in present else 0.0 for n in names}, index=table.index
    )
    path = _stripped(table, "Image Index")
    patient = _stripped(table, "Patient ID")
    study = patient + "/" + _stripped(table, "Follow-up #")
    view = _normalize_views(table["View Position"], csv, warn=False)
    return _records(table, path, patient, study, view, labels, extra), names


_MIMIC_KEYS = ["subject_id", "study_id"]


def _load_mimic(csv: Path, spec: str | None, metadata_csv: Path | None, extra: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    names = resolve_labels(spec, CHEXPERT_LABELS)
    _check_label_names(names)
    metadata_csv = Path(metadata_csv) if metadata_csv is not None else csv.parent / MIMIC_METADATA_NAME
    if not metadata_csv.is_file():
        raise UserError(
            f"MIMIC-CXR metadata CSV not found: {metadata_csv}; pass --metadata PATH/{MIMIC_METADATA_NAME}"
        )
    table = _read_table(csv, "MIMIC-CXR labels CSV")
    _require_columns(table, [*_MIMIC_KEYS, *names], csv)
    metadata = _read_table(metadata_csv, "MIMIC-CXR metadata CSV")
    _require_columns(metadata, ["dicom_id", *_MIMIC_KEYS, "ViewPosition", *extra], metadata_csv)

    study_labels = pd.concat(
        [pd.DataFrame({k: _stripped(table, k) for k in _MIMIC_KEYS}), _parse_labels(table, names, csv)], axis=1
    )
    repeated = study_labels.duplicated(_MIMIC_KEYS)
    if repeated.any():
        first = int(np.flatnonzero(repeated.to_numpy())[0])
        raise UserError(f"{csv}, line {_line(table, first)}: second labels row for the same subject_id and study_id")
    images = pd.DataFrame({k: _stripped(metadata, k) for k in ["dicom_id", *_MIMIC_KEYS]})
    images["view"] = _normalize_views(metadata["ViewPosition"], metadata_csv, warn=False).to_numpy()
    for column in extra:
        images[column] = metadata[column].to_numpy()
    joined = images.merge(study_labels, on=_MIMIC_KEYS, how="inner")  # keys checked unique above

    notes = []
    dropped = len(images) - len(joined)
    if dropped:
        studies = images[_MIMIC_KEYS].drop_duplicates().merge(study_labels[_MIMIC_KEYS], how="left", indicator=True)
        unlabeled = int((studies["_merge"] == "left_only").sum())
        note = f"mimic: dropped {dropped} images of {unlabeled} studies that have no row in {csv.name}"
        log.warning(note)
        notes.append(note)
    subject, study = joined["subject_id"], joined["study_id"]
    path = "files/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + joined["dicom_id"] + ".jpg"
    records = _records(joined, path, subject, study, joined["view"], joined[names], extra)
    records.attrs["notes"] = notes
    return records, names
