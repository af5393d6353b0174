"""Source adapters on small CSVs written in the real datasets' column layouts."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

from cxrdist.data.ingest.sources import (
    FRONTAL_VIEWS,
    SOURCES,
    filter_views,
    in_test_list,
    load_records,
    read_test_list,
    resolve_paths,
)
from cxrdist.errors import UserError
from cxrdist.labels import CHEXPERT_LABELS, NIH_LABELS

CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS)


def chexpert_row(path: str, side: str, ap_pa: str, values: dict[str, str]) -> str:
    return ",".join([path, "Female", "68", side, ap_pa] + [values.get(n, "") for n in CHEXPERT_LABELS])


def write(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def labels_of(records: pd.DataFrame, row: int, names: list[str]) -> list[float]:
    return records.loc[row, names].tolist()


def same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- chexpert


@pytest.fixture
def chexpert_csv(tmp_path):
    return write(
        tmp_path / "train.csv",
        [
            CHEXPERT_HEADER,
            chexpert_row(
                "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                "Frontal", "AP", {"No Finding": "1.0", "Support Devices": "1.0"},
            ),
            chexpert_row(
                "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg",
                "Frontal", "PA", {"Cardiomegaly": "-1.0", "Edema": "0.0", "Lung Opacity": "1.0"},
            ),
            chexpert_row(
                "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg",
                "Lateral", "", {"Cardiomegaly": "-1.0", "Edema": "0.0"},
            ),
        ],
    )


def test_chexpert_paths_patients_studies_views_labels(chexpert_csv):
    records, names = load_records("chexpert", chexpert_csv)
    assert names == CHEXPERT_LABELS
    assert list(records.columns) == ["path", "patient", "study", "view", *CHEXPERT_LABELS]
    assert records["path"].tolist()[0] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert records["patient"].tolist() == ["patient00001", "patient00002", "patient00002"]
    assert records["study"].tolist() == ["patient00001/study1", "patient00002/study2", "patient00002/study2"]
    assert records["view"].tolist() == ["AP", "PA", "LATERAL"]
    assert all(records[n].dtype == np.float64 for n in names)
    row1 = dict(zip(names, labels_of(records, 1, names)))
    assert row1["Cardiomegaly"] == -1.0 and row1["Edema"] == 0.0 and row1["Lung Opacity"] == 1.0
    assert math.isnan(row1["No Finding"]) and math.isnan(row1["Fracture"])


def test_chexpert_label_subset_and_frontal_filter(chexpert_csv):
    records, names = load_records("chexpert", chexpert_csv, labels="Cardiomegaly,Edema", views="frontal")
    assert names == ["Cardiomegaly", "Edema"]
    assert list(records.columns) == ["path", "patient", "study", "view", "Cardiomegaly", "Edema"]
    assert records["view"].tolist() == ["AP", "PA"]
    assert list(records.index) == [0, 1]


def test_chexpert_bad_label_value_names_line_and_column(tmp_path):
    csv = write(
        tmp_path / "train.csv",
        [
            CHEXPERT_HEADER,
            chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", {}),
            chexpert_row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", "Frontal", "AP",
                         {"Edema": "yes"}),
        ],
    )
    with pytest.raises(UserError, match=r"train\.csv, line 3, column 'Edema': bad label value 'yes'"):
        load_records("chexpert", csv)


def test_chexpert_unparseable_path(tmp_path):
    csv = write(tmp_path / "valid.csv", [CHEXPERT_HEADER, chexpert_row("images/a.jpg", "Frontal", "AP", {})])
    with pytest.raises(UserError, match=r"line 2: Path 'images/a.jpg'"):
        load_records("chexpert", csv)


def test_chexpert_missing_columns_lists_found(tmp_path):
    csv = write(tmp_path / "train.csv", ["Path,Sex,Age,Frontal/Lateral,Edema", "a,F,1,Frontal,1"])
    with pytest.raises(UserError, match=r"missing column\(s\) 'AP/PA', 'No Finding'.*columns found: 'Path', 'Sex'"):
        load_records("chexpert", csv)


# ---------------------------------------------------------------- generic csv


def test_generic_csv_values_and_optional_columns(tmp_path):
    csv = write(
        tmp_path / "labels.csv",
        [
            "path,patient,study,view,A,B",
            "img/1.png,p1,s1,pa,1,-1.0",
            "",  # a blank line is skipped but still counted in line numbers
            "img/2.png,p1,s2,Lateral,0.0,",
            "img/3.png,p2,,AP AXIAL, -1 ,1.0",
        ],
    )
    records, names = load_records("csv", csv, labels="A,B")
    assert names == ["A", "B"]
    assert records["path"].tolist() == ["img/1.png", "img/2.png", "img/3.png"]
    assert records["patient"].tolist() == ["p1", "p1", "p2"]
    assert records["study"].tolist() == ["s1", "s2", ""]
    assert records["view"].tolist() == ["PA", "LATERAL", ""]
    assert same(labels_of(records, 0, names), [1.0, -1.0])
    assert same(labels_of(records, 1, names), [0.0, float("nan")])
    assert same(labels_of(records, 2, names), [-1.0, 1.0])


def test_generic_csv_bad_value_counts_lines_including_blank_ones(tmp_path):
    csv = write(tmp_path / "labels.csv", ["path,patient,A", "a.png,p,1", "", "b.png,p,2", "c.png,p,x"])
    with pytest.raises(UserError, match=r"line 4, column 'A': bad label value '2'.*\(1 more bad values"):
        load_records("csv", csv, labels="A")


def test_generic_csv_without_patient_is_refused_unless_grouping_is_waived(tmp_path):
    csv = write(tmp_path / "labels.csv", ["path,A", "./a.png,1", "b.png,0"])
    with pytest.raises(UserError, match="no 'patient' column.*--no-patient-grouping"):
        load_records("csv", csv, labels="A")
    records, _ = load_records("csv", csv, labels="A", no_patient_grouping=True)
    assert any("own patient" in note for note in records.attrs["notes"])
    assert records["patient"].tolist() == ["a.png", "b.png"]
    assert records["study"].tolist() == ["", ""] and records["view"].tolist() == ["", ""]


def test_generic_csv_defaults_to_chexpert_labels_or_asks_for_labels(tmp_path):
    full = write(tmp_path / "full.csv", ["path,patient," + ",".join(CHEXPERT_LABELS), "a.png,p" + ",1" * 14])
    assert load_records("csv", full)[1] == CHEXPERT_LABELS
    partial = write(tmp_path / "partial.csv", ["path,patient,Edema", "a.png,p,1"])
    with pytest.raises(UserError, match=r"no --labels given.*columns found: 'path', 'patient', 'Edema'"):
        load_records("csv", partial)


def test_generic_csv_missing_columns_and_duplicates(tmp_path):
    csv = write(tmp_path / "labels.csv", ["file,patient,A", "a.png,p,1"])
    with pytest.raises(UserError, match=r"missing column\(s\) 'path', 'B'; columns found: 'file', 'patient', 'A'"):
        load_records("csv", csv, labels="A,B")
    dup = write(tmp_path / "dup.csv", ["path,patient,A", "a.png,p,1", "b.png,p,1", "a.png,q,0", "b.png,q,0"])
    with pytest.raises(UserError, match=r"2 image path\(s\) appear more than once, e.g. 'a.png', 'b.png'"):
        load_records("csv", dup, labels="A")


def test_generic_csv_blank_patient_and_missing_file(tmp_path):
    csv = write(tmp_path / "labels.csv", ["path,patient,A", "a.png,p,1", "b.png,,1"])
    with pytest.raises(UserError, match=r"line 3: blank 'patient'"):
        load_records("csv", csv, labels="A")
    with pytest.raises(UserError, match="label CSV not found"):
        load_records("csv", tmp_path / "nope.csv", labels="A")
    header_only = write(tmp_path / "empty.csv", ["path,patient,A"])
    with pytest.raises(UserError, match="no image rows"):
        load_records("csv", header_only, labels="A")


# ---------------------------------------------------------------- nih

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


@pytest.fixture
def nih_csv(tmp_path):
    return write(
        tmp_path / "Data_Entry_2017.csv",
        [
            NIH_HEADER,
            "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143",
            "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
            "00000002_000.png,No Finding,0,2,81,M,AP,2500,2048,0.171,0.171",
            "00000003_000.png,Hernia|Pleural_Thickening|Effusion,0,3,81,F,PA,2582,2991,0.143,0.143",
        ],
    )


def test_nih_pipe_labels_no_finding_and_ids(nih_csv):
    records, names = load_records("nih", nih_csv)
    assert names == NIH_LABELS
    assert records["path"].tolist() == ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"]
    assert records["patient"].tolist() == ["1", "1", "2", "3"]
    assert records["study"].tolist() == ["1/0", "1/1", "2/0", "3/0"]
    assert records["view"].tolist() == ["PA", "PA", "AP", "PA"]
    positives = [sorted(n for n in names if records.loc[i, n] == 1.0) for i in range(4)]
    assert positives == [
        ["Cardiomegaly"],
        ["Cardiomegaly", "Emphysema"],
        [],
        ["Effusion", "Hernia", "Pleural_Thickening"],
    ]
    assert records[names].isin([0.0, 1.0]).all().all()  # NIH has no uncertain or blank labels


def test_nih_no_finding_as_a_label(nih_csv):
    records, names = load_records("nih", nih_csv, labels="No Finding,Effusion")
    assert records["No Finding"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert records["Effusion"].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_nih_unknown_finding_and_unknown_label(tmp_path, nih_csv):
    csv = write(tmp_path / "bad.csv", [NIH_HEADER, "a.png,Cardiomegaly,0,1,1,M,PA,1,1,1,1",
                                       "b.png,Cardiomegaly|Cancer,0,2,1,M,PA,1,1,1,1"])
    with pytest.raises(UserError, match=r"bad\.csv, line 3: unknown finding\(s\) 'Cancer'"):
        load_records("nih", csv)
    with pytest.raises(UserError, match=r"'Fracture' not in NIH"):
        load_records("nih", nih_csv, labels="Fracture")


def test_nih_resolve_paths_in_nested_official_folders(tmp_path, nih_csv):
    root = tmp_path / "nih"
    for folder, name in [("images_001/images", "00000001_000.png"), ("images_001/images", "00000001_001.png"),
                         ("images_002/images", "00000002_000.png")]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_bytes(b"x")
    (root / "00000003_000.png").write_bytes(b"x")  # already flat
    records, _ = load_records("nih", nih_csv)
    resolved = resolve_paths(records, root)
    assert resolved["path"].tolist() == [
        "images_001/images/00000001_000.png",
        "images_001/images/00000001_001.png",
        "images_002/images/00000002_000.png",
        "00000003_000.png",
    ]
    assert records["path"].tolist()[0] == "00000001_000.png"  # input untouched
    (root / "images_002/images/00000001_000.png").write_bytes(b"x")
    with pytest.raises(UserError, match="in 2 folders"):
        resolve_paths(records, root)


def test_test_list_matches_names_and_paths(tmp_path, nih_csv):
    listing = write(tmp_path / "test_list.txt", ["00000001_001.png", "", "# comment", "00000003_000.png"])
    entries = read_test_list(listing)
    assert entries == {"00000001_001.png", "00000003_000.png"}
    records, _ = load_records("nih", nih_csv)
    records["path"] = "images_001/images/" + records["path"]
    assert in_test_list(records, entries).tolist() == [False, True, False, True]
    with pytest.raises(UserError, match="cannot read"):
        read_test_list(tmp_path / "missing.txt")


# ---------------------------------------------------------------- mimic

MIMIC_META_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
    "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)


def meta_row(dicom: str, subject: str, study: str, view: str) -> str:
    return f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect"


@pytest.fixture
def mimic_dir(tmp_path):
    def chexpert_line(subject, study, values):
        return ",".join([subject, study] + [values.get(n, "") for n in CHEXPERT_LABELS])

    write(
        tmp_path / "mimic-cxr-2.0.0-chexpert.csv",
        [
            "subject_id,study_id," + ",".join(CHEXPERT_LABELS),
            chexpert_line("10000032", "50414267", {"No Finding": "1.0"}),
            chexpert_line("10000032", "53189527", {"Edema": "-1.0", "Pleural Effusion": "0.0"}),
            chexpert_line("10000898", "50771383", {"Pneumonia": "1.0"}),
        ],
    )
    write(
        tmp_path / "mimic-cxr-2.0.0-metadata.csv",
        [
            MIMIC_META_HEADER,
            meta_row("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA"),
            meta_row("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL"),
            meta_row("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP"),
            meta_row("0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c", "10000898", "50771383", ""),
            meta_row("ffffffff-00000000-11111111-22222222-33333333", "10000999", "59999999", "PA"),  # no labels
        ],
    )
    return tmp_path


def test_mimic_join_paths_and_dropped_studies(mimic_dir, caplog):
    with caplog.at_level(logging.WARNING):
        records, names = load_records("mimic", mimic_dir / "mimic-cxr-2.0.0-chexpert.csv")
    assert names == CHEXPERT_LABELS
    assert len(records) == 4
    assert records["path"].tolist()[0] == (
        "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    )
    assert records["path"].tolist()[3] == (
        "files/p10/p10000898/s50771383/0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c.jpg"
    )
    assert records["patient"].tolist() == ["10000032", "10000032", "10000032", "10000898"]
    assert records["study"].tolist() == ["50414267", "50414267", "53189527", "50771383"]
    assert records["view"].tolist() == ["PA", "LATERAL", "AP", ""]
    assert records["No Finding"].tolist()[:2] == [1.0, 1.0]
    assert records.loc[2, "Edema"] == -1.0 and records.loc[2, "Pleural Effusion"] == 0.0
    assert np.isnan(records.loc[2, "Cardiomegaly"])
    assert records.attrs["notes"] == [
        "mimic: dropped 1 images of 1 studies that have no row in mimic-cxr-2.0.0-chexpert.csv"
    ]
    assert "dropped 1 images" in caplog.text


def test_mimic_explicit_metadata_frontal_and_missing_metadata(tmp_path, mimic_dir):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    meta = (mimic_dir / "mimic-cxr-2.0.0-metadata.csv").rename(moved / "meta.csv")
    with pytest.raises(UserError, match="pass --metadata"):
        load_records("mimic", mimic_dir / "mimic-cxr-2.0.0-chexpert.csv")
    records, _ = load_records("mimic", mimic_dir / "mimic-cxr-2.0.0-chexpert.csv", views="frontal", metadata_csv=meta)
    assert records["view"].tolist() == ["PA", "AP"]


# ---------------------------------------------------------------- views and arguments


def test_filter_views():
    df = pd.DataFrame({"path": list("abcde"), "view": ["PA", "AP", "LATERAL", "LL", ""]})
    assert filter_views(df, "all")["path"].tolist() == list("abcde")
    assert filter_views(df, "frontal")["path"].tolist() == ["a", "b"]
    assert FRONTAL_VIEWS == {"PA", "AP"}
    with pytest.raises(UserError, match="no images left after --views frontal"):
        filter_views(df[df["view"].isin(["LATERAL", ""])], "frontal")
    with pytest.raises(UserError, match="--views 'side'"):
        filter_views(df, "side")


def test_bad_source_and_metadata_with_other_source(tmp_path, nih_csv):
    assert SOURCES == ("csv", "chexpert", "nih", "mimic")
    with pytest.raises(UserError, match="--source 'padchest'"):
        load_records("padchest", nih_csv)
    with pytest.raises(UserError, match="only used with --source mimic"):
        load_records("nih", nih_csv, metadata_csv=tmp_path / "m.csv")
