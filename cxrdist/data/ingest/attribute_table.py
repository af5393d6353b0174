"""What `prepare` reads as attributes (cxrdist/data/attributes.py): the request (`--attributes`, `--attributes-table`,
`--attributes-join`, `--attributes-key`, `--age-bins`), checked before anything is read, and the typed values of
every record, from the label table's columns and from a separate table joined by patient id or image path.

A join table: one row per patient (or image path); e.g. MIMIC-IV's patients.csv with
`--attributes-table patients.csv --attributes-key subject_id --attributes sex=gender,age=anchor_age`.
Rows of one key that disagree are refused; patients missing from it get "unknown" (a note says how many).
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrdist.data.attributes import (
    AGE,
    CATEGORY,
    DATASET,
    DEFAULT_AGE_BINS,
    MAX_AGE,
    MAX_CATEGORIES,
    SEX,
    VIEW,
    AttributeSpec,
    age_value,
    is_missing,
    kind_of,
    sex_value,
    spec_of,
)
from cxrdist.errors import UserError

RESERVED = ("path", "patient", "study", "key", "split", DATASET, VIEW)
SOURCE_COLUMNS: dict[str, dict[str, str]] = {
    "chexpert": {SEX: "Sex", AGE: "Age"},
    "nih": {SEX: "Patient Gender", AGE: "Patient Age"},
}
JOINS = ("patient", "path")


@dataclass
class AttributeRequest:
    """What prepare was asked to read: {name: column} of the label table and {name: column} of the join table."""

    from_csv: dict[str, str]
    from_table: dict[str, str]
    table: Path | None = None
    join: str = "patient"
    key: str = "patient"
    age_bins: tuple[float, ...] = DEFAULT_AGE_BINS

    @property
    def names(self) -> list[str]:
        return [*self.from_csv, *self.from_table]


def parse_spec(text: str | None) -> dict[str, str]:
    """`--attributes "sex,age=Patient Age,site"` -> {name: column} (a bare NAME reads the column NAME)."""
    pairs: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, column = item.partition("=")
        name, column = name.strip(), (column or name).strip()
        if not name or not column:
            raise UserError(f"--attributes {text!r}: {item.strip()!r} is not NAME or NAME=COLUMN")
        if name in pairs:
            raise UserError(f"--attributes {text!r}: the attribute {name!r} is named twice")
        pairs[name] = column
    return pairs


def parse_bins(text: str | None) -> tuple[float, ...]:
    """`--age-bins 18,40,60,80` -> the increasing lower edges of every age group but the first (0-17)."""
    if text is None:
        return DEFAULT_AGE_BINS
    try:
        edges = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--age-bins {text!r}: expected increasing ages in years, e.g. 18,40,60,80") from None
    if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])) or not all(map(math.isfinite, edges)):
        raise UserError(f"--age-bins {text!r}: expected increasing ages above 0, e.g. 18,40,60,80")
    return edges


def build_request(source: str, spec: str | None, csv_columns: Sequence[str], table: Path | None = None,
                  join: str = "patient", key: str | None = None, age_bins: str | None = None) -> AttributeRequest:
    """The source's own attributes (those its table has) and `--attributes`, each column found in the join table or the
    label table; a reserved name, or a column neither has, is a UserError (a name like a label: `check_names`)."""
    asked = parse_spec(spec)
    check_names(asked, [])
    if join not in JOINS:
        raise UserError(f"--attributes-join {join!r}: expected one of {', '.join(JOINS)}")
    if table is None and key is not None:
        raise UserError("--attributes-key names a column of --attributes-table, which is not given")
    table_columns: list[str] = []
    if table is not None:
        table_columns = read_table(table).columns.tolist()
        key = key or join
        if key not in table_columns:
            raise UserError(f"--attributes-table {table}: no column {key!r} to join on (columns: {', '.join(table_columns)}); "
                            "name it with --attributes-key")
    from_csv = {name: column for name, column in SOURCE_COLUMNS.get(source, {}).items() if name not in asked and column in csv_columns}
    from_table = {}
    for name, column in asked.items():
        if column in table_columns and column != key:
            from_table[name] = column
        elif column in csv_columns:
            from_csv[name] = column
        else:
            where = "the label table" + (f" nor --attributes-table {table}" if table is not None else "")
            raise UserError(f"--attributes: the dataset has no column {column!r} for the attribute {name!r} (not in {where}; "
                            f"its columns: {', '.join(csv_columns)})")
    if table is not None and not from_table:
        raise UserError(f"--attributes-table {table}: --attributes names none of its columns ({', '.join(table_columns)})")
    return AttributeRequest(from_csv, from_table, table, join, key or join, parse_bins(age_bins))


def check_names(names: Sequence[str], labels: Sequence[str]) -> None:
    """An attribute may not be named like a label or a reserved record column (case-insensitive)."""
    lowered = {label.lower(): label for label in labels}
    for name in names:
        if name.lower() in RESERVED:
            raise UserError(f"--attributes: {name!r} is a reserved name ({', '.join(RESERVED)}; the view is kept anyway): choose another")
        if name.lower() in lowered:
            raise UserError(f"--attributes: {name!r} is named like the label {lowered[name.lower()]!r}: choose another name")


def typed_column(name: str, raw: Sequence[str], where: str, images: Sequence[str]) -> tuple[list, AttributeSpec, list[str]]:
    """(typed values, spec, notes) of one attribute's text column (one per image of `images`); a non-numeric age is a
    UserError naming its image."""
    kind, notes = kind_of(name), []
    texts = ["" if text is None else str(text) for text in raw]
    if kind == AGE:
        values = []
        for i, text in enumerate(texts):
            try:
                values.append(age_value(text))
            except ValueError:
                raise UserError(f"{where}: the age {text!r} of {images[i]} is not a number of years (like 58, 058Y or 6M)") from None
        implausible = [v for v in values if v is not None and v > MAX_AGE]
        if implausible:
            notes.append(f"{len(implausible)} images have an age above {MAX_AGE} years in {where} (e.g. {implausible[0]:g}): "
                         "taken as a typo, their age is unknown")
            values = [None if v is not None and v > MAX_AGE else v for v in values]
    else:
        values = [sex_value(t) if kind == SEX else (None if is_missing(t) else t.strip()) for t in texts]
        distinct = {v for v in values if v is not None}
        if len(distinct) > MAX_CATEGORIES:
            raise UserError(f"--attributes {name}: {where} has {len(distinct)} distinct values, more than {MAX_CATEGORIES}; "
                            "an attribute groups images (bin or merge its values first)")
    return values, spec_of(name, kind, where, values), notes


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--attributes-table {path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"--attributes-table {path}: cannot parse as CSV ({' '.join(str(err).split())})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def joined_columns(request: AttributeRequest, records: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The join table's requested columns aligned with `records` (blank where a patient or path is missing from it),
    and a note on how many are; rows of one key that disagree are a UserError."""
    table = read_table(request.table)
    columns = list(dict.fromkeys(request.from_table.values()))
    keys = table[request.key].astype(str).str.strip()
    if request.join == "path":  # as the label CSV's paths are: ./a.png and a.png are one path
        keys = keys.map(posixpath.normpath)
    rows = pd.concat([keys.rename("__key__"), table[columns]], axis=1).drop_duplicates()
    repeated = rows["__key__"].duplicated(keep=False)
    if repeated.any():
        key = rows.loc[repeated, "__key__"].iloc[0]
        clash = rows[rows["__key__"] == key]
        column = next(c for c in columns if clash[c].nunique() > 1)
        values = " vs ".join(repr(v) for v in clash[column].unique()[:2])
        raise UserError(f"--attributes-table {request.table}: {request.join} {key!r} has {len(clash)} rows that disagree on "
                        f"{column!r} ({values}); keep one row per {request.join}")
    lookup = rows.set_index("__key__")
    wanted = records[request.join].astype(str)
    joined = lookup.reindex(wanted.to_numpy()).reset_index(drop=True).fillna("")
    absent = ~wanted.isin(lookup.index).to_numpy()
    notes = []
    if absent.any():
        notes.append(f"{wanted[absent].nunique()} of {wanted.nunique()} {request.join}s ({int(absent.sum())} images) are not in "
                     f"--attributes-table {request.table}: their {', '.join(request.from_table)} unknown")
    return joined, notes


def attribute_values(request: AttributeRequest, records: pd.DataFrame, raw: Mapping[str, pd.Series], csv_name: str
                     ) -> tuple[dict[str, list], list[AttributeSpec], list[str]]:
    """({name: typed value per record}, specs, notes): the view, the source's and the requested columns.
    `raw` holds the label table's requested columns as text, aligned with `records`."""
    columns: dict[str, list] = {}
    specs: list[AttributeSpec] = []
    notes: list[str] = []
    views = [v or None for v in records["view"].astype(str).tolist()]
    if any(views):
        columns[VIEW] = views
        specs.append(spec_of(VIEW, CATEGORY, "the source's view (PA, AP, LATERAL, LL)", views))
    table, notes = joined_columns(request, records) if request.table is not None else (None, [])
    sources = [(name, raw[name].tolist(), f"column {column!r} of {csv_name}") for name, column in request.from_csv.items()]
    sources += [(name, table[column].tolist(), f"column {column!r} of {Path(request.table).name}") for name, column in request.from_table.items()]
    for name, texts, where in sources:
        values, spec, column_notes = typed_column(name, texts, where, records["path"].tolist())
        if spec.kind == AGE:
            spec.bins = list(request.age_bins)
        columns[name] = values
        specs.append(spec)
        notes += column_notes
    return columns, specs, notes
