"""`cxrdist report`: the page and its figures, rendered in headless Chromium (every image loads, no error)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrdist.data.manifest import Manifest, ShardInfo, SplitInfo
from cxrdist.errors import UserError
from cxrdist.evaluation.report.report import balance_table, coupling_summary, fold_agreement, label_correlation, run_report
from cxrdist.evaluation.report.html import table

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
# Injected into a copy of the page: records script errors, failed resource loads and console.error,
# and after the load event lists the images that did not decode; --dump-dom then shows the result.
PROBE = """<script>
window.__problems = [];
window.addEventListener('error', e => window.__problems.push(e.message || ('failed to load ' + (e.target.src || e.target.href))), true);
const __consoleError = console.error;
console.error = (...args) => { window.__problems.push('console.error: ' + args.join(' ')); __consoleError(...args); };
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  const out = document.createElement('pre');
  out.id = 'probe';
  const page = document.documentElement.clientWidth;
  const wider = Array.from(document.body.querySelectorAll('*')).filter(e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && (r.right > page + 1 || r.left < -1);
  }).map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '') + ' ' + Math.round(e.getBoundingClientRect().right) + 'px');
  out.textContent = JSON.stringify({images: images.length, broken: broken, problems: window.__problems, page: page, wider: wider});
  document.body.appendChild(out);
});
</script>"""


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


def run_chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


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


def test_page_renders_in_headless_chromium(report, chromium):
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("<head>", "<head>" + PROBE, 1))
    result = run_chromium(chromium, "--window-size=1400,1000", "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no probe result in the DOM (exit {result.returncode}):\n{result.stderr[-3000:]}"
    found = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert found["images"] >= 6 and found["broken"] == [] and found["problems"] == []
    assert found["page"] > 1300 and found["wider"] == [], f"elements wider than the {found['page']} px page: {found['wider'][:10]}"
    probe.unlink()

    shot = report.with_name("screenshot.png")
    result = run_chromium(chromium, "--window-size=1300,2400", f"--screenshot={shot}", report.as_uri())
    assert shot.is_file(), result.stderr[-3000:]
    with Image.open(shot) as image:
        assert image.size == (1300, 2400)
        assert len(np.unique(np.asarray(image.convert("L").resize((64, 64))))) > 20  # not a blank page


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
