"""`cxrdist report`: the page and its figures, rendered in headless Chromium at 1400 and 800 px (tests/page_layout.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrdist.data.manifest import Manifest, ShardInfo, SplitInfo
from cxrdist.errors import UserError
from cxrdist.evaluation.report.report import balance_table, coupling_summary, fold_agreement, label_correlation, run_report
from cxrdist.evaluation.report.html import table
from page_layout import figure_text_px, measure, screenshot

@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get (as root) when missing; skipped when that is impossible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for steps in ([["apt-get", "install", "-y", "chromium"]], [["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]]):
        try:
            if all(subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode == 0 for cmd in steps):
                break
        except (OSError, subprocess.TimeoutExpired):
            pass
    found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium could not be installed with apt-get")
    return found


@pytest.fixture(scope="module")
def report(evaluated_experiment, tmp_path_factory) -> Path:
    runs, _ = evaluated_experiment
    return run_report(runs, tmp_path_factory.mktemp("report"))


def test_page_lists_every_section_and_its_figures_exist(report, evaluated_experiment):
    runs, metrics = evaluated_experiment
    page = report.read_text()
    for title in ("Data", "Discrimination", "Predictions", "Label couplings", "Training", "Fold balance", "Sample images", "ROC curves (ensemble)"):
        assert f">{title}<" in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert {Path(s).name for s in sources} >= {"label_frequency.png", "samples.png", "roc.png", "label_correlation.png", "fold_agreement.png",
                                               "training.png"}
    for src in sources:
        assert not src.startswith(("http:", "https:", "/")) and (report.parent / src).is_file()
        with Image.open(report.parent / src) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert f"{metrics['ensemble']['macro_auc']:.3f}" in page
    assert 0 < page.index("Test macro AUC (ensemble") < page.index("Held-out fold macro AUC, selected on that fold")
    assert "uncertain entries left out of that label" in page
    assert "http://" not in page and "https://" not in page


def five_fold_copy(runs: Path, out: Path) -> Path:
    """The fixture's experiment as the demo's (5 fold models in the AUC table, 14 CheXpert labels): its folds' best models
    and logs, and its evaluation with three more fold columns (copies of fold-0's AUCs), the widest table a demo page has."""
    for fold in ("fold-0", "fold-1"):
        shutil.copytree(runs / fold / "best", out / fold / "best")
        shutil.copy(runs / fold / "metrics.jsonl", out / fold / "metrics.jsonl")
    shutil.copytree(runs / "ensemble", out / "ensemble")
    metrics = json.loads((out / "ensemble" / "metrics.json").read_text())
    for extra in ("fold-2", "fold-3", "fold-4"):
        metrics["model_names"].append(extra)
        metrics["models"][extra] = metrics["models"]["fold-0"]
    (out / "ensemble" / "metrics.json").write_text(json.dumps(metrics))
    return out


@pytest.fixture(scope="module")
def wide_report(evaluated_experiment, tmp_path_factory) -> Path:
    runs, _ = evaluated_experiment
    copy = five_fold_copy(runs, tmp_path_factory.mktemp("five") / "ens")
    return run_report(copy, copy / "report")


# A figure's <img width> is its pixel width / DENSITY rounded to a whole CSS px, so its text may show up to ~0.05 px smaller.
ROUNDING_PX = 0.1


@pytest.mark.parametrize("width", [1400, 800])
@pytest.mark.parametrize("which", ["report", "wide_report"])
def test_page_reads_in_chromium_at_1400_and_800_px(which, width, request, chromium):
    """Every image loads; nothing is wider than the window; no table is cut off behind a horizontal scroll; no CSS may split
    a word and no word is laid out across two lines; every figure's text shows at least as large as the page's smallest
    body text. A screenshot of the page at that width is written next to it."""
    page = request.getfixturevalue(which)
    found = measure(chromium, page, width)
    assert found["images"] >= 6 and found["broken"] == [] and found["problems"] == []
    assert found["page"] == width and found["wider"] == [], f"elements wider than the {width} px page: {found['wider'][:10]}"
    assert found["cut"] == [], f"tables cut off behind a horizontal scroll at {width} px: {found['cut']}"
    assert found["splitting"] == [] and found["split"] == [], (found["splitting"][:5], found["split"][:10])
    assert found["smallest_text_px"] >= 12
    small = {Path(f["file"]).name: round(figure_text_px(f), 2) for f in found["figures"]
             if figure_text_px(f) < found["smallest_text_px"] - ROUNDING_PX}
    assert small == {}, f"figure text smaller than the page's smallest text ({found['smallest_text_px']} px) at {width} px: {small}"

    shot = page.with_name(f"screenshot-{width}.png")
    result = screenshot(chromium, page, width, 2400, shot)
    assert shot.is_file(), result.stderr[-3000:]
    with Image.open(shot) as image:
        assert image.size == (width, 2400)
        assert len(np.unique(np.asarray(image.convert("L").resize((64, 64))))) > 20  # not a blank page


def test_roc_curves_at_auc_one_stay_off_the_frame():
    from cxrdist.evaluation.figures import UNIT_MARGIN, roc_figure

    targets = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    scores = np.array([[0.1, 0.2], [0.2, 0.9], [0.8, 0.3], [0.9, 0.8]])  # the first label separated: AUC 1.000
    fig = roc_figure(["Edema", "Cardiomegaly"], targets, scores, np.ones_like(targets, dtype=bool), {"Edema": 1.0, "Cardiomegaly": 0.75})
    ax = fig.axes[0]
    curve = next(line for line in ax.lines if line.get_linestyle() == "-")
    x, y = curve.get_data()
    assert set(np.round(x, 6)) <= {0.0, 0.5, 1.0} and y.max() == 1.0 and x.min() == 0.0  # it runs along x = 0 and y = 1
    assert ax.get_xlim() == pytest.approx((-UNIT_MARGIN, 1 + UNIT_MARGIN)) and ax.get_ylim() == pytest.approx((-UNIT_MARGIN, 1 + UNIT_MARGIN))
    assert UNIT_MARGIN >= 0.02  # inside the frame by a few line widths


def test_report_before_evaluate_says_so(trained_experiment, tmp_path):
    runs = tmp_path / "ens"
    for fold in ("fold-0", "fold-1"):
        shutil.copytree(trained_experiment / fold / "best", runs / fold / "best")
        shutil.copy(trained_experiment / fold / "metrics.jsonl", runs / fold / "metrics.jsonl")
    page = run_report(runs).read_text()
    assert "cxrdist evaluate</code> has not been run" in page
    assert (runs / "report" / "figures" / "training.png").is_file()
    assert not (runs / "report" / "figures" / "roc.png").exists()
    with pytest.raises(UserError, match="no fold-K run directories"):
        run_report(tmp_path / "ens" / "fold-0")


def test_text_from_data_is_escaped():
    label = '<img src=x onerror="alert(1)">&'
    split = SplitInfo(num_samples=2, num_patients=1, shards=[ShardInfo("fold-0/shard-000000.tar", 2, 1, "x")], prevalence={label: 0.5})
    manifest = Manifest(labels=[label], splits={"fold-0": split}, num_folds=1, seed=0, source={}, image={})
    html = balance_table(manifest) + table([label], [["x"]])
    assert "<img" not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in html


def test_summaries_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    p = rng.random((50, 3))
    p[:, 2] = p[:, 0] ** 3  # same order as label 0
    corr = label_correlation(p)
    assert corr[0, 2] == pytest.approx(1.0) and corr[0, 0] == pytest.approx(1.0) and abs(corr[0, 1]) < 0.5
    folds = np.stack([p, p ** 2, 1 - p])
    agreement = fold_agreement(folds)
    assert agreement[0, 1] == pytest.approx(1.0) and agreement[0, 2] == pytest.approx(-1.0)
    a = np.zeros((3, 3), dtype=np.float32)
    a[0, 1], a[2, 0] = 0.5, -0.7
    sparsity, top = coupling_summary(a, ["x", "y", "z"])
    assert sparsity == pytest.approx(4 / 6)
    assert [(s, t) for s, t, _ in top] == [("z", "x"), ("x", "y")]
