"""Attributes read by `prepare` from the public sources' own columns (real header spellings and real rows of CheXpert's
train.csv, NIH ChestX-ray14's Data_Entry_2017.csv and its Kaggle sample's "060Y" ages, MIMIC-CXR's metadata CSV and
MIMIC-IV's patients.csv), stored in the shards and the manifest; the bad inputs of the issue; a dataset prepared before
attributes existed; and attributes never reaching a training batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrdist.cli import main
from cxrdist.data.attributes import specs_of
from cxrdist.data.manifest import MANIFEST_NAME, load_one_manifest
from cxrdist.data.shards import RawSample, read_shard_samples
from cxrdist.data.spec import ImageSpec
from cxrdist.data.stream import StreamConfig, decode_train_batch
from cxrdist.evaluation.scoring.subgroups import NO_ATTRIBUTES, subgroup_audit
from cxrdist.labels import CHEXPERT_LABELS

CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS)
CHEXPERT_ROWS = [  # the first rows of CheXpert-v1.0-small/train.csv, and a patient whose sex is "Unknown" as CheXpert writes it
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
    "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,83,Frontal,AP,,,,1.0,,,-1.0,,,,,,1.0,",
    "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,,,,,,,1.0,",
    "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,AP,,,,,,1.0,,,,0.0,,,,",
    "CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg,Female,20,Frontal,PA,1.0,0.0,,,,0.0,0.0,,,,0.0,,,",
    "CheXpert-v1.0-small/train/patient00004/study1/view2_lateral.jpg,Female,20,Lateral,,1.0,0.0,,,,0.0,0.0,,,,0.0,,,",
    "CheXpert-v1.0-small/train/patient00005/study1/view1_frontal.jpg,Male,33,Frontal,PA,1.0,,0.0,,,,,,,,0.0,,,1.0",
    "CheXpert-v1.0-small/train/patient00006/study1/view1_frontal.jpg,Unknown,,Frontal,AP,,,,,,,,,,,1.0,,,",
]
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_ROWS = [  # Data_Entry_2017.csv (plain ages), then the Kaggle sample's spelling ("060Y") and an age no patient has
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171",
    "00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143",
    "00000013_005.png,Emphysema|Infiltration|Pleural_Thickening|Pneumothorax,5,13,060Y,M,AP,3056,2544,0.139,0.139",
    "00000032_001.png,Cardiomegaly|Edema|Effusion,1,32,055Y,F,AP,2500,2048,0.168,0.168",
    "00000040_000.png,Atelectasis,0,40,413,F,PA,2500,2048,0.168,0.168",
]
MIMIC_META_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,"
                     "ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning")
MIMIC_IV_PATIENTS = "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod"
# prepare refuses a fold on which no label has both classes: a few real rows alone make such folds, so each table gets
# PADDING more patients (one image each, Cardiomegaly alternately positive and negative, half female, aged 50, PA)
PADDING = 16
CHEXPERT_PADDING = [f"CheXpert-v1.0-small/train/patient9{k:04d}/study1/view1_frontal.jpg,{('Female', 'Male')[k % 2]},50,Frontal,PA,,,"
                    + ("1.0" if k % 2 else "0.0") + ",,,,,,,,,,," for k in range(PADDING)]
NIH_PADDING = [f"0009{k:04d}_000.png,{('Cardiomegaly', 'No Finding')[k % 2]},0,9{k:04d},50,{'FM'[k % 2]},PA,2500,2048,0.168,0.168"
               for k in range(PADDING)]


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def images(root: Path, paths: list[str]) -> Path:
    rng = np.random.default_rng(0)
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / rel, format="PNG")
    return root


def prepare(*args: str) -> int:
    return main(["prepare", "--folds", "2", "--max-size", "32", "--format", "png", "--samples-per-shard", "4", *args])


def stored(out: Path) -> dict[str, dict]:
    """{path: attributes} of every sample in the shards."""
    found = {}
    for shard in sorted(out.rglob("*.tar")):
        for _, _, meta in read_shard_samples(shard):
            found[meta["path"]] = meta["attributes"]
    return found


def test_chexpert_sex_age_and_view_are_read_typed_and_stored(tmp_path, capsys):
    csv = write(tmp_path / "train.csv", [CHEXPERT_HEADER, *CHEXPERT_ROWS, *CHEXPERT_PADDING])
    root = images(tmp_path / "data", [row.split(",")[0] for row in CHEXPERT_ROWS + CHEXPERT_PADDING])
    assert prepare("--source", "chexpert", "--csv", str(csv), "--images", str(root), "--out", str(tmp_path / "out")) == 0
    found = stored(tmp_path / "out")
    assert found["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"] == {"view": "AP", "sex": "F", "age": 68.0}
    assert found["CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg"] == {"view": "LATERAL", "sex": "F", "age": 83.0}
    assert found["CheXpert-v1.0-small/train/patient00005/study1/view1_frontal.jpg"] == {"view": "PA", "sex": "M", "age": 33.0}
    assert found["CheXpert-v1.0-small/train/patient00006/study1/view1_frontal.jpg"] == {"view": "AP", "sex": None, "age": None}
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 2
    specs = {spec["name"]: spec for spec in manifest["attributes"]}
    assert specs["sex"] == {"name": "sex", "kind": "sex", "source": "column 'Sex' of train.csv", "bins": [], "unknown": 1,
                            "values": {"F": 6 + PADDING // 2, "M": 2 + PADDING // 2}}
    assert specs["age"]["kind"] == "age" and specs["age"]["bins"] == [18.0, 40.0, 60.0, 80.0] and specs["age"]["unknown"] == 1
    assert specs["view"]["values"] == {"AP": 5, "LATERAL": 2, "PA": 2 + PADDING}


def test_nih_gender_and_ages_in_both_spellings(tmp_path, capsys):
    csv = write(tmp_path / "Data_Entry_2017.csv", [NIH_HEADER, *NIH_ROWS, *NIH_PADDING])
    root = images(tmp_path / "nih", [row.split(",")[0] for row in NIH_ROWS + NIH_PADDING])
    assert prepare("--source", "nih", "--csv", str(csv), "--images", str(root), "--out", str(tmp_path / "out"), "--age-bins", "40,65") == 0
    found = stored(tmp_path / "out")
    assert found["00000001_000.png"] == {"view": "PA", "sex": "M", "age": 58.0}
    assert found["00000013_005.png"] == {"view": "AP", "sex": "M", "age": 60.0}
    assert found["00000032_001.png"] == {"view": "AP", "sex": "F", "age": 55.0}
    assert found["00000040_000.png"]["age"] is None  # 413 years: a typo, unknown, and said
    assert "1 images have an age above 120 years" in capsys.readouterr().out
    spec = next(s for s in specs_of(load_one_manifest(tmp_path / "out")) if s.name == "age")
    assert spec.bins == [40.0, 65.0]


@pytest.fixture
def mimic(tmp_path) -> Path:
    labels = ["subject_id,study_id," + ",".join(CHEXPERT_LABELS)]
    padding = [(f"19{k:06d}", f"59{k:06d}", f"pad-{k}", "PA") for k in range(PADDING)]
    for subject, study in (("10000032", "50414267"), ("10000032", "53189527"), ("10000898", "50771383"), ("10001217", "58913004")):
        labels.append(f"{subject},{study}," + ",".join("1.0" if i == 10 else "" for i in range(len(CHEXPERT_LABELS))))
    for k, (subject, study, _, _) in enumerate(padding):  # Cardiomegaly (column 2) alternately positive and negative
        labels.append(f"{subject},{study}," + ",".join(("1.0" if k % 2 else "0.0") if i == 2 else "" for i in range(len(CHEXPERT_LABELS))))
    write(tmp_path / "mimic-cxr-2.0.0-chexpert.csv", labels)
    rows = [("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA"),
            ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL"),
            ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP"),
            ("0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c", "10000898", "50771383", "PA"),
            ("5e54fc9c-37c49834-9ac3b915-55811712-9d959d26", "10001217", "58913004", "AP")] + [(d, s, st, v) for s, st, d, v in padding]
    write(tmp_path / "mimic-cxr-2.0.0-metadata.csv", [MIMIC_META_HEADER] + [
        f"{d},{s},{st},CHEST (PA AND LAT),{v},3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect" for d, s, st, v in rows])
    images(tmp_path / "mimic-cxr-jpg", [f"files/p{s[:2]}/p{s}/s{st}/{d}.jpg" for d, s, st, _ in rows])
    return tmp_path


def test_mimic_view_from_its_metadata_and_sex_age_joined_from_mimic_iv_patients(mimic, capsys):
    padding = [f"19{k:06d},{'FM'[k % 2]},50,2180,2014 - 2016," for k in range(PADDING)]
    patients = write(mimic / "patients.csv", [MIMIC_IV_PATIENTS, "10000032,F,52,2180,2014 - 2016,2180-09-09", "10000898,F,76,2187,2014 - 2016,",
                                              *padding])
    assert prepare("--source", "mimic", "--csv", str(mimic / "mimic-cxr-2.0.0-chexpert.csv"), "--images", str(mimic / "mimic-cxr-jpg"),
                   "--out", str(mimic / "out"), "--attributes-table", str(patients), "--attributes-key", "subject_id",
                   "--attributes", "sex=gender,age=anchor_age") == 0
    found = stored(mimic / "out")
    by_dicom = {Path(path).stem: attributes for path, attributes in found.items()}
    assert by_dicom["174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"] == {"view": "LATERAL", "sex": "F", "age": 52.0}
    assert by_dicom["0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c"] == {"view": "PA", "sex": "F", "age": 76.0}
    assert by_dicom["5e54fc9c-37c49834-9ac3b915-55811712-9d959d26"] == {"view": "AP", "sex": None, "age": None}
    assert f"1 of {3 + PADDING} patients (1 images) are not in --attributes-table" in capsys.readouterr().out
    manifest = json.loads((mimic / "out" / MANIFEST_NAME).read_text())
    assert any("are not in --attributes-table" in note for note in manifest["source"]["notes"])


def generic(tmp_path: Path, extra: dict[str, list[str]]) -> tuple[Path, Path]:
    rows = ["path,patient,view,Edema,Cardiomegaly," + ",".join(extra)]
    for i in range(6):
        rows.append(f"p{i}/a.png,p{i},{'AP' if i % 2 else 'PA'},{i % 2},{1 - i % 2}," + ",".join(values[i] for values in extra.values()))
    csv = write(tmp_path / "labels.csv", rows)
    return csv, images(tmp_path / "images", [f"p{i}/a.png" for i in range(6)])


BAD = {  # each: (extra CSV columns, prepare arguments, words of the one line)
    "non-numeric age": ({"age": ["54", "61", "seventy", "40", "", "33"]}, ["--attributes", "age"], "the age 'seventy' of p2/a.png"),
    "named like a label": ({"site": ["a"] * 6}, ["--attributes", "edema=site"], "named like the label 'Edema'"),
    "a reserved name": ({"site": ["a"] * 6}, ["--attributes", "patient=site"], "reserved name"),
    "a column the dataset lacks": ({"site": ["a"] * 6}, ["--attributes", "race"], "no column 'race' for the attribute 'race'"),
    "too many values": ({"id": [f"x{i}" for i in range(6)]}, ["--attributes", "id"], None),
    "duplicate patients that disagree": ({"site": ["a"] * 6}, ["--attributes", "insurance", "--attributes-table", "TABLE"],
                                         "patient 'p1' has 2 rows that disagree on 'insurance'"),
    "bad age bins": ({"age": ["1"] * 6}, ["--attributes", "age", "--age-bins", "60,40"], "increasing ages"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_attribute_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case, monkeypatch):
    extra, args, words = BAD[case]
    if case == "too many values":
        monkeypatch.setattr("cxrdist.data.ingest.attribute_table.MAX_CATEGORIES", 5)
        words = "6 distinct values, more than 5"
    csv, root = generic(tmp_path, extra)
    table = write(tmp_path / "insurance.csv", ["patient,insurance", "p0,Medicare", "p1,Medicaid", "p1,Private"])
    args = [str(table) if a == "TABLE" else a for a in args]
    code = prepare("--csv", str(csv), "--images", str(root), "--out", str(tmp_path / "out"), "--labels", "Edema,Cardiomegaly", *args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_generic_csv_columns_named_on_the_command_line(tmp_path, capsys):
    csv, root = generic(tmp_path, {"Site Name": ["north", "south", "", "north", "NaN", "south"], "AgeYears": ["54", "61", "70", "40", "", "33"]})
    assert prepare("--csv", str(csv), "--images", str(root), "--out", str(tmp_path / "out"), "--labels", "Edema,Cardiomegaly",
                   "--attributes", "site=Site Name,age=AgeYears") == 0
    found = stored(tmp_path / "out")
    assert found["p2/a.png"] == {"view": "PA", "site": None, "age": 70.0}
    assert found["p3/a.png"] == {"view": "AP", "site": "north", "age": 40.0}
    assert {s.name: s.kind for s in specs_of(load_one_manifest(tmp_path / "out"))} == {"view": "category", "site": "category", "age": "age"}


def test_a_table_joined_by_image_path(tmp_path, capsys):
    csv, root = generic(tmp_path, {})
    table = write(tmp_path / "by_image.csv", ["image,scanner,age", "p0/a.png,GE,50", "./p1/a.png,Philips,61", "p2/a.png,GE,"])
    assert prepare("--csv", str(csv), "--images", str(root), "--out", str(tmp_path / "out"), "--labels", "Edema,Cardiomegaly",
                   "--attributes-table", str(table), "--attributes-join", "path", "--attributes-key", "image", "--attributes", "scanner,age") == 0
    found = stored(tmp_path / "out")
    assert found["p0/a.png"] == {"view": "PA", "scanner": "GE", "age": 50.0} and found["p2/a.png"]["age"] is None
    assert found["p5/a.png"] == {"view": "AP", "scanner": None, "age": None}
    assert found["p1/a.png"]["scanner"] == "Philips"  # ./p1/a.png in the table is p1/a.png
    assert "3 of 6 paths (3 images) are not in --attributes-table" in capsys.readouterr().out


def test_a_dataset_prepared_before_attributes_loads_without_an_audit(tmp_path, capsys):
    csv, root = generic(tmp_path, {})
    assert prepare("--csv", str(csv), "--images", str(root), "--out", str(tmp_path / "out"), "--labels", "Edema,Cardiomegaly") == 0
    path = tmp_path / "out" / MANIFEST_NAME
    data = json.loads(path.read_text())
    del data["attributes"]
    path.write_text(json.dumps({**data, "format_version": 1}))
    manifest = load_one_manifest(tmp_path / "out")
    assert manifest.format_version == 1 and specs_of(manifest) == []
    result = subgroup_audit(["Edema"], np.zeros((6, 1)), np.zeros((6, 1)), np.ones((6, 1)), [f"p{i}" for i in range(6)], [{}] * 6, [])
    assert result["notes"] == [NO_ATTRIBUTES] and result["attributes"] == {}


def test_attributes_never_reach_a_training_batch(tmp_path):
    """The same images and labels with other attribute values make the same training batch, which holds nothing else."""
    buffer = __import__("io").BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)).save(buffer, format="PNG")

    def sample(key: str, attributes: dict) -> tuple[int, RawSample]:
        meta = {"labels": [1, 0], "patient": key, "study": "", "view": "PA", "path": key, "attributes": attributes}
        return 0, RawSample(key, buffer.getvalue(), json.dumps(meta).encode())

    cfg = StreamConfig(ImageSpec(32), batch_size=2, workers=0)
    a = decode_train_batch([sample("k1", {"sex": "F", "age": 30.0}), sample("k2", {"sex": "M", "age": 80.0})], cfg, 2)
    b = decode_train_batch([sample("k1", {"sex": "M", "age": 90.0}), sample("k2", {"sex": None, "age": None})], cfg, 2)
    assert set(a) == {"image", "labels_raw", "key", "corrupt", "corrupt_keys"}
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
