"""Real NIH ChestX-ray14 label-table rows (tests/fixtures/nih, public domain) written in the 2017 and the 2020 spelling of
the table, with small synthetic images under their file names, prepared with `--source nih` into real shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROWS = Path(__file__).resolve().parent / "fixtures" / "nih" / "Data_Entry_2017-rows.csv"
# Data_Entry_2017.csv: "Patient Gender", the header ends in a comma (an unnamed 12th column), the rows do not.
HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
# Data_Entry_2017_v2020.csv: "Patient Sex", and every line ends in a comma.
HEADER_2020 = HEADER_2017.replace("Patient Gender", "Patient Sex")
FILE_NAMES = {"2017": "Data_Entry_2017.csv", "2020": "Data_Entry_2017_v2020.csv"}
NIH_WITH_NO_FINDING = ("Atelectasis,Cardiomegaly,Effusion,Infiltration,Mass,Nodule,Pneumonia,Pneumothorax,Consolidation,Edema,"
                       "Emphysema,Fibrosis,Pleural_Thickening,Hernia,No Finding")


def rows(patients) -> list[str]:
    """The table's lines of these patient ids."""
    wanted = set(patients)
    return [line for line in ROWS.read_text().splitlines()[1:] if int(line.split(",")[3]) in wanted]


def write_table(folder: Path, lines: list[str], spelling: str) -> Path:
    path = folder / FILE_NAMES[spelling]
    body = [HEADER_2017, *lines] if spelling == "2017" else [HEADER_2020, *(line + "," for line in lines)]
    path.write_text("\n".join(body) + "\n")
    return path


def draw_images(folder: Path, lines: list[str], seed: int) -> None:
    """A 64 px grayscale PNG per row: noise, and a bright patch low on one side where the row has Effusion (something to learn)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for line in lines:
        name, findings = line.split(",")[:2]
        pixels = rng.integers(40, 120, size=(64, 64), dtype=np.uint8)
        if "Effusion" in findings.split("|"):
            pixels[40:60, 4:24] = 230
        Image.fromarray(pixels, mode="L").save(folder / name)


def prepare_nih(root: Path, patients, spelling: str = "2017", labels: str = NIH_WITH_NO_FINDING, test_patients=(), seed: int = 0,
                only: str | None = None) -> Path:
    """Shards of these patients' rows (with `only`: just the rows whose findings are exactly that), 2 folds, the rows of
    `test_patients` as the test split (NIH's test_list.txt)."""
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare

    lines = [line for line in rows(patients) if only is None or line.split(",")[1] == only]
    root.mkdir(parents=True, exist_ok=True)
    draw_images(root / "images", lines, seed)
    test_list = None
    if test_patients:
        test_list = root / "test_list.txt"
        test_list.write_text("\n".join(line.split(",")[0] for line in lines if int(line.split(",")[3]) in set(test_patients)) + "\n")
    prepare(PrepareOptions(source="nih", csv=write_table(root, lines, spelling), images=root / "images", out=root / "shards", folds=2,
                           test_list=test_list, max_size=64, fmt="png", samples_per_shard=40, workers=1, labels=labels, seed=seed,
                           progress=False))
    return root / "shards"
