"""The report's data and "Datasets and external validation" sections for several datasets (evaluation/report/): each
dataset's own label frequencies and folds, and every field taken from a metrics or lodo file escaped."""

from __future__ import annotations

import json

import pytest
from test_datasets import NIH_STYLE, prepare_synthetic

from cxrdist.data.datasets import open_datasets
from cxrdist.data.manifest import load_one_manifest
from cxrdist.evaluation.report.datasets import datasets_section
from cxrdist.evaluation.report.report import data_section

SCRIPT = "<script>alert(1)</script>"


def test_two_datasets_show_each_ones_label_frequencies_and_folds(tmp_path):
    a = prepare_synthetic(tmp_path / "a", seed=3, n=60, folds=2)
    b = prepare_synthetic(tmp_path / "b", seed=5, n=60, folds=2, rename=NIH_STYLE)
    root, manifest = open_datasets([{"location": str(a), "name": "a"}, {"location": str(b), "name": "b"}])
    html = data_section(root, manifest, tmp_path / "figures", patient_ids=False)
    for name, location in (("a", a), ("b", b)):
        own = load_one_manifest(location)
        assert f"Fold balance, dataset {name}" in html and (tmp_path / "figures" / f"label_frequency-{name}.png").is_file()
        table = html.split(f"Fold balance, dataset {name}")[1].split("</table>")[0]
        effusion = "Effusion" if name == "b" else "Pleural Effusion"  # each in its own names
        fold0 = own.splits["fold-0"]
        assert fold0.positives[effusion] > 0
        assert f"{100 * fold0.positives[effusion] / fold0.num_samples:.1f}%" in table.split(f"<td class=\"l\">{effusion}</td>")[1]
        assert f"{fold0.num_samples:,}" in table
    # the pooled counts of the combined manifest are real too (no label left at zero)
    assert manifest.splits["fold-0"].positives["Pleural Effusion"] == sum(
        load_one_manifest(x).splits["fold-0"].positives[n] for x, n in ((a, "Pleural Effusion"), (b, "Effusion")))


def hostile_metrics() -> dict:
    return {"split": SCRIPT, "labels": ["Edema", SCRIPT], "external": True,
            "external_dataset": {"name": SCRIPT, "split": SCRIPT, "identity": SCRIPT},
            "per_dataset": {SCRIPT: {"macro_auc": SCRIPT, "labels": SCRIPT, "evaluated": SCRIPT}},
            "ensemble": {"macro_auc": 0.7, "per_label": {"Edema": SCRIPT, SCRIPT: 0.8},
                         "interval": {"per_label": {"Edema": [SCRIPT, 1], SCRIPT: [SCRIPT, SCRIPT]}}}}


@pytest.mark.parametrize("folder", ["site", SCRIPT.replace("/", "")])
def test_every_field_of_an_external_metrics_or_lodo_file_is_escaped(tmp_path, folder):
    result = tmp_path / "external" / folder
    result.mkdir(parents=True)
    (result / "metrics.json").write_text(json.dumps(hostile_metrics()))
    (tmp_path / "lodo").mkdir()
    row = {"trained_on": [SCRIPT], "external": {"macro_auc": SCRIPT, "labels": [SCRIPT]}, "internal": {"macro_auc": 0.5, "labels": []},
           "compared": {"labels": [SCRIPT], "external_macro_auc": SCRIPT, "internal_macro_auc": None}}
    (tmp_path / "lodo" / "lodo.json").write_text(json.dumps({"external_split": SCRIPT, "internal_split": SCRIPT, "held_out": {SCRIPT: row}}))
    html = datasets_section(tmp_path, None)
    assert "<script" not in html.lower() and "&lt;script&gt;" in html
    assert "Leave one dataset out" in html and "Internal vs external, per label" in html
