"""Messages a newcomer meets: an override typo names the override, plurals, every --help option explained,
an inert refinement linked to the ablation's difference, the README's ONNX example, captioned Grad-CAM overlays."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cxrdist.cli import build_parser, main
from cxrdist.errors import UserError
from cxrdist.text import count
from cxrdist.training.config import load_config

REPO_README = __import__("pathlib").Path(__file__).resolve().parents[1] / "README.md"


def test_an_override_typo_names_the_override_not_the_config_file(tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text("train:\n  epochs: 2\n")
    with pytest.raises(UserError) as err:
        load_config(config, ["train.lr=0.1", "train.epochz=3"])
    assert str(err.value).startswith("override 'train.epochz=3' (command line): ") and "my.yaml" not in str(err.value)
    config.write_text("train:\n  epochz: 2\n")  # the same typo in the file: the file is named
    with pytest.raises(UserError, match="my.yaml"):
        load_config(config, [])
    with pytest.raises(UserError, match=r"override 'train.epochs=many' \(command line\)"):
        load_config(None, ["data.shards=x", "train.epochs=many"])
    assert load_config(None, ["data.shards=x", "train.epochs=3", "train.epochs=4"]).train.epochs == 4  # the last one wins


def test_counts_are_plural_only_when_they_should_be():
    assert [count(n, "image file") for n in (0, 1, 2)] == ["0 image files", "1 image file", "2 image files"]
    assert count(1, "coupling") == "1 coupling" and count(1, "patient", "patients") == "1 patient"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_help_option_is_explained(name):
    parser = subcommands()[name]
    unexplained = [a.option_strings or [a.dest] for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    assert unexplained == [], f"cxrdist {name}: options without help: {unexplained}"


def test_synth_help_says_what_each_option_does(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    for option, words in {"--n": "how many", "--size": "pixels", "--seed": "same seed", "--workers": "processes", "--out": "labels.csv"}.items():
        assert re.search(re.escape(option) + r"\b.*" + words, text, re.S), (option, text)


# ---------------------------------------------------------------- the refinement ablation: inert in every fold


def set_coupling(best, value) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(best / "model.safetensors"))
    weights["refine.weight"] = value(weights["refine.weight"])
    save_file(weights, str(best / "model.safetensors"))


def test_compare_and_report_say_when_the_refinement_ended_inert_in_every_fold(evaluated_experiment, tmp_path, capsys):
    import torch

    runs_a, runs_b = tmp_path / "ens-a", tmp_path / "ens-b"
    for copy in (runs_a, runs_b):
        shutil.copytree(evaluated_experiment[0], copy, ignore=shutil.ignore_patterns("checkpoints", "report", "compare"))
    for best in sorted(runs_b.glob("fold-*/best")):
        set_coupling(best, torch.zeros_like)
    assert main(["compare", str(runs_a), str(runs_b), "--resamples", "50"]) == 0
    stdout = capsys.readouterr().out
    result = json.loads((runs_b / "compare" / "compare.json").read_text())
    assert result["b"]["inert"].keys() == {"fold-0", "fold-1"} and all(result["b"]["inert"].values())
    assert "ended inert (A zero) in every fold of B" in result["inert_note"] and "trajectory" in result["inert_note"]
    assert f"note: {result['inert_note']}" in stdout

    from cxrdist.evaluation.report.report import run_report

    page = run_report(runs_b, out=tmp_path / "report").read_text()
    help_section = page[page.index("Does the refinement help?"):]
    assert "ended inert (A zero) in every fold of B" in help_section
    couplings = page[page.index('id="couplings"'):]
    couplings = couplings[:couplings.index("</section>")]
    assert couplings.count("refinement is inert") == 1 and "fold-0, fold-1: the label-graph refinement is inert" in couplings
    assert couplings.count("<h3>fold-0</h3>") <= 1  # no fold heading twice

    def one_strong_coupling(a):
        a = torch.zeros_like(a)
        a[0, 1] = 1.0
        return a

    set_coupling(runs_b / "fold-1" / "best", one_strong_coupling)  # one fold keeps a coupling: no note
    assert main(["compare", str(runs_a), str(runs_b), "--resamples", "50"]) == 0
    result = json.loads((runs_b / "compare" / "compare.json").read_text())
    assert result["inert_note"] is None and result["b"]["inert"]["fold-1"] is None and "ended inert" not in capsys.readouterr().out


# ---------------------------------------------------------------- the README's ONNX example, Grad-CAM overlays


def readme_onnx_example() -> str:
    text = REPO_README.read_text()
    match = re.search(r"python - <<'PY'[^\n]*\n(.*?)\nPY\n", text, re.S)
    assert match, "the README's ONNX example (python - <<'PY' ... PY) is gone"
    return match.group(1)


def test_the_readmes_onnx_example_runs_on_a_64_px_export(trained_experiment, tmp_path):
    """Run in out/ (where the README's export command writes cxr.onnx, its sidecar and preprocess.py; .gitignore lists
    it), on a real chest radiograph (DICOM) and a PNG."""
    from PIL import Image

    assert main(["export", "--runs", str(trained_experiment), "--format", "onnx", "--out", str(tmp_path / "out" / "cxr.onnx")]) == 0
    shutil.copy(REPO_README.parent / "tests" / "data" / "cr_chest_mono1.dcm", tmp_path / "out" / "chest.dcm")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 70), dtype=np.uint8)).save(tmp_path / "out" / "chest.png")
    run = subprocess.run([sys.executable, "-c", readme_onnx_example()], cwd=tmp_path / "out", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["chest.dcm", "chest.png"], run.stdout
    sidecar = json.loads((tmp_path / "out" / "cxr.onnx.json").read_text())
    assert sidecar["input"]["shape"][2:] == [64, 64]
    for line in lines:
        probabilities = eval(line.split(" ", 1)[1])  # noqa: S307 - the example prints a dict literal of floats
        assert list(probabilities) == sidecar["labels"] and all(0.0 <= p <= 1.0 for p in probabilities.values())


def test_overlays_are_drawn_at_the_stored_size_with_the_finding_written_on_them(trained_experiment, tmp_path):
    import torch
    from PIL import Image

    from cxrdist.evaluation.prediction.models import load_fold_models
    from cxrdist.evaluation.prediction.saliency import write_overlays

    models = load_fold_models(trained_experiment)
    card = models[0].card
    stored = [np.full((96, 128), 90, np.uint8)]  # an image stored at 128x96, seen by the model at 64x64
    probs = np.zeros((1, card.num_labels))
    probs[0, 2] = 0.87
    rows = write_overlays(tmp_path, ["img"], torch.zeros(1, card.image.channels, 64, 64), probs, [m.model for m in models],
                          card.labels, card.image, tta=False, threshold=0.5, top=1, stored=stored)
    assert [(r["label"], r["probability"]) for r in rows] == [(card.labels[2], 0.87)]
    with Image.open(tmp_path / rows[0]["file"]) as image:
        rgb = np.asarray(image.convert("RGB"))
    band = rgb.shape[0] - 96
    assert rgb.shape[1] == 128 and band > 0
    assert rgb[:band].max() > 200 and rgb[:band].mean() < 60  # white writing on the black band above the image
    assert rgb[band:].shape[:2] == (96, 128)


def test_the_caption_is_the_finding_and_its_probability(monkeypatch, tmp_path):
    from PIL import ImageDraw

    from cxrdist.evaluation.prediction import saliency

    written = []
    original = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, **kw: written.append(text) or original(self, xy, text, **kw))
    out = saliency.captioned(np.zeros((40, 50, 3), np.uint8), "Pleural Effusion 0.87")
    assert written == ["Pleural Effusion 0.87"] and out.shape[1] == 50 and out.shape[0] > 40


def test_a_temperature_at_the_fitting_bound_is_said():
    import math

    from cxrdist.evaluation.clinical.calibration import LOG_TEMPERATURE_BOUNDS, fit_temperature
    from cxrdist.evaluation.report.clinical import temperature_cell

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 400).astype(float)
    noise = rng.uniform(0.01, 0.99, 400)  # probabilities that know nothing about the targets
    t = fit_temperature(targets, noise)
    assert t == pytest.approx(math.exp(LOG_TEMPERATURE_BOUNDS[1]), rel=0.1)  # the fit runs (nearly) into its bound
    assert temperature_cell(t).startswith(f"{t:.2f}") and "at the bound" in temperature_cell(t)
    assert "at the bound" not in temperature_cell(1.3) and "at the bound" not in temperature_cell(None)
    assert "at the bound" in temperature_cell(math.exp(LOG_TEMPERATURE_BOUNDS[0]))


def test_patient_ids_stay_out_of_the_report_for_csv_data_unless_asked(synth_shards, tmp_path, monkeypatch):
    from cxrdist.data.datasets import load_manifest
    from cxrdist.data.stream import read_shards
    from cxrdist.evaluation.report import report

    manifest = load_manifest(synth_shards)
    assert manifest.source["name"] == "csv"
    assert report.show_patient_ids(manifest, None) is False and report.show_patient_ids(manifest, True) is True
    public = type(manifest)(**{**manifest.__dict__, "source": {**manifest.source, "name": "chexpert"}})
    assert report.show_patient_ids(public, None) is True and report.show_patient_ids(public, False) is False

    drawn = []
    monkeypatch.setattr(report.figs, "sample_grid", lambda path, images, captions, titles: drawn.append(titles) or path)
    patients = {json.loads(sample.meta).get("patient") for sample in read_shards(synth_shards, manifest.split("test").shards)}
    report.sample_images(synth_shards, manifest, tmp_path / "hidden.png", patient_ids=False)
    report.sample_images(synth_shards, manifest, tmp_path / "shown.png", patient_ids=True)
    hidden, shown = drawn
    assert not any(p and p in title for title in hidden for p in patients)
    assert all(any(p and p in title for p in patients) for title in shown)
