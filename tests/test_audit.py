"""The subgroup audit end to end, on real shards and real trained models: a planted gap the audit must find (and a
control attribute and an unplanted dataset it must not flag), the report's "Who the model fails" at 1400 and 800 px,
2 training processes whose gathered audit equals one process's, and the evaluate-time refusals."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from page_layout import PROBE, run_chromium
from test_report import chromium  # noqa: F401 - the fixture
from trainer_utils import DEMO_CONFIG, explain, fast_overrides, launch_cpu, records, run_single

from cxrdist.cli import main
from cxrdist.data.datasets import load_manifest
from cxrdist.data.prepare import PrepareOptions, prepare
from cxrdist.data.shards import read_shard_samples
from cxrdist.data.stream import StreamConfig, eval_loader
from cxrdist.data.synth.dataset import make_synthetic_dataset
from cxrdist.evaluation.prediction.ensemble import run_evaluate
from cxrdist.evaluation.report.report import run_report
from cxrdist.evaluation.scoring.gathered import predict
from cxrdist.labels.eval_targets import evaluation_policy
from cxrdist.model.export import load_model
from cxrdist.training.config import load_config
from cxrdist.training.validation_audit import ValidationAudit

pytestmark = pytest.mark.slow
PLANT = "Pleural Effusion:sex=F:0.1"  # the finding drawn at a tenth of its strength on women's films


def synth_shards(root, n: int, seed: int, folds: int, test: float, plant: str | None = None):
    csv = make_synthetic_dataset(root / "raw", n=n, size=96, seed=seed, workers=2, progress=False, planted_gap=plant)
    prepare(PrepareOptions(source="csv", csv=csv, images=root / "raw" / "images", out=root / "shards", folds=folds, test_fraction=test,
                           max_size=64, fmt="png", samples_per_shard=50, workers=2, progress=False, attributes="sex,age"))
    return root / "shards"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A model trained on synthetic films where Pleural Effusion is faint on women's, evaluated on its test split."""
    root = tmp_path_factory.mktemp("planted")
    shards = synth_shards(root, n=1300, seed=3, folds=5, test=0.35, plant=PLANT)
    result = run_single(["--fold", "0", *fast_overrides(shards, root / "runs", **{
        "experiment": "plant", "train.epochs": 10, "train.eval_every": 100000, "train.log_every": 50})], timeout=880)
    assert result.returncode == 0, explain(result)
    fold = root / "runs" / "plant" / "fold-0"
    metrics = run_evaluate(fold, split="test", out=fold.parent / "ensemble", batch_size=64, workers=0, resamples=500)
    return root, shards, fold, metrics


def flags(metrics: dict) -> set[tuple[str, str, str]]:
    return {(f["attribute"], f["group"], f["metric"]) for f in metrics["subgroups"]["flagged"]}


def test_the_planted_group_is_flagged_and_the_control_attribute_is_not(planted):
    _, _, fold, metrics = planted
    found = flags(metrics)
    assert ("sex", "F", "AUC Pleural Effusion") in found, metrics["subgroups"]["flagged"]
    assert not [f for f in found if f[0] == "age"], f"the control attribute was flagged: {found}"
    women = metrics["subgroups"]["attributes"]["sex"]["groups"]["F"]
    assert women["gap"]["per_label"]["Pleural Effusion"]["value"] < -0.1 and women["gap"]["per_label"]["Pleural Effusion"]["flagged"]
    (record,) = records(fold, "eval")[-1:]  # the validation during training audited too
    assert record["subgroups"]["attributes"]["sex"]["groups"]["F"]["reported"]
    table = pd.read_csv(fold.parent / "ensemble" / "predictions.csv", dtype={"key": str, "attr_sex": str})
    assert {"attr_sex", "attr_age", "attr_view"} <= set(table.columns) and set(table["attr_sex"]) == {"F", "M"}


def test_unplanted_datasets_flag_sex_or_age_no_more_than_the_family_rate(planted, tmp_path):
    """The planted model on three unplanted synthetic hospitals: sex and age are independent of every film there, so a
    flag on them is a false positive, which each audit makes with probability about 5% (the family-wise rate): any one
    hospital may flag (seed 4 with 500 films did: Atelectasis for sex, a chance association of that sample, p ~ 0.0004
    when its patients' sexes are permuted). At most 1 of 3 may flag (2 or more: 0.7% at a 5% rate); the planted gap never."""
    _, _, fold, _ = planted
    flagged = []
    for seed in (4, 5, 6):
        other = synth_shards(tmp_path / f"seed{seed}", n=450, seed=seed, folds=2, test=0.0)
        metrics = run_evaluate(fold, split="all", batch_size=64, workers=0, resamples=500, external=other, out=tmp_path / f"external{seed}")
        assert metrics["subgroups"]["attributes"]["sex"]["groups"]["F"]["reported"]
        found = [f for f in flags(metrics) if f[0] in ("sex", "age")]
        assert ("sex", "F", "AUC Pleural Effusion") not in found
        flagged.append(bool(found))
    assert sum(flagged) <= 1, flagged


def test_report_says_who_the_model_fails_and_fits_1400_and_800_px(planted, chromium):  # noqa: F811 - the fixture
    root, _, fold, metrics = planted
    page = run_report(fold.parent, root / "report", shards=planted[1]).read_text()
    assert ">Who the model fails<" in page and "sex = F</b>" in page and "lower" in page
    figures = re.findall(r'<img src="(figures/subgroups-\d+\.png)"', page)
    assert len(figures) == len(metrics["subgroups"]["attributes"]) and all((root / "report" / f).is_file() for f in figures)
    probe = root / "report" / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE.replace("document.body.querySelectorAll('*')",
                                                                      "document.querySelectorAll('#audit *')"), 1))
    for width in (1400, 800):
        result = run_chromium(chromium, f"--window-size={width},1000", "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
        match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
        assert match, result.stderr[-2000:]
        found = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        assert found["broken"] == [] and found["problems"] == [] and found["wider"] == [], (width, found["wider"][:10])


@pytest.mark.parametrize("pair, words", [("sex,sex", "crossed with itself"), ("sex,race", "no attribute 'race'")])
def test_evaluate_refuses_a_bad_intersection_before_predicting(planted, tmp_path, capsys, pair, words):
    _, _, fold, _ = planted
    code = main(["evaluate", "--runs", str(fold), "--workers", "0", "--intersect", pair, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def close(a, b, path: str = "") -> None:
    """Equal structures, floats to 1e-9."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            close(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=0, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_two_processes_gather_the_audit_one_process_computes(tmp_path):
    """Two ranks (world size asserted inside) audit their gathered validation; one process, same checkpoint, same audit."""
    shards = synth_shards(tmp_path, n=400, seed=7, folds=2, test=0.2)
    result = launch_cpu(["--fold", "0", *fast_overrides(shards, tmp_path / "runs", **{"train.epochs": 1, "experiment": "two"})], processes=2)
    assert result.returncode == 0, explain(result)
    run = tmp_path / "runs" / "two" / "fold-0"
    (record,) = records(run, "eval")
    assert [r["world_size"] for r in records(run, "train")][-1] == 2
    model, card = load_model(run / "best")
    manifest = load_manifest(shards)
    cfg = StreamConfig(card.image, batch_size=card.eval_batch_size, workers=0)
    preds = predict({"ema": model}, eval_loader(shards, manifest, ["fold-0"], cfg, 0, 1), "cpu", pad_to=card.eval_batch_size).sorted()
    config = load_config(DEMO_CONFIG, [f"data.shards={shards}"])
    policy = evaluation_policy(card.evaluation.targets, len(manifest.labels))
    alone = ValidationAudit.of(config.eval, manifest).run(preds, "ema", manifest.labels, policy)
    assert record["subgroups"]["attributes"]["sex"]["groups"]["F"]["reported"]
    close(json.loads(json.dumps(alone)), record["subgroups"])
    table = pd.read_csv(run / "val_predictions.csv", dtype={"key": str, "attr_sex": str})
    truth = {meta["path"]: meta["attributes"]["sex"] for shard in sorted((shards / "fold-0").glob("*.tar"))
             for _, _, meta in read_shard_samples(shard)}
    assert len(table) == len(truth) and sorted(table["attr_sex"]) == sorted(truth.values())
    assert np.isfinite(table.filter(like="prob_").to_numpy()).all()


def test_a_dataset_prepared_before_attributes_evaluates_with_one_line_and_no_audit(trained_experiment, synth_shards, tmp_path, capsys):
    """Shards whose manifest is format 1 (no attributes) still evaluate; the audit is absent and said so once."""
    import shutil

    from cxrdist.evaluation.scoring.subgroups import NO_ATTRIBUTES

    old = tmp_path / "old-shards"
    shutil.copytree(synth_shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["attributes"]
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    metrics = run_evaluate(trained_experiment, split="test", batch_size=32, workers=0, resamples=20, shards=old, out=tmp_path / "ens")
    assert metrics["subgroups"] == {"attributes": {}, "flagged": [], "notes": [NO_ATTRIBUTES]}
    assert capsys.readouterr().out.count("no subgroup audit") == 1
    page = run_report(trained_experiment, tmp_path / "report", shards=old).read_text()
    assert ">Who the model fails<" in page


def test_group_aucs_and_intervals_equal_sklearn_and_brute_force_on_the_written_predictions(planted):
    """metrics.json's subgroup numbers recomputed from predictions.csv alone: scikit-learn's AUC per group, and the
    percentile interval of a brute-force patient bootstrap (explicit per-image weights, the evaluation's seed and count)."""
    from bootstrap_reference import reference_patient_weights
    from sklearn.metrics import roc_auc_score

    from cxrdist.evaluation.scoring.bootstrap import weighted_auc

    _, _, fold, metrics = planted
    table = pd.read_csv(fold.parent / "ensemble" / "predictions.csv", dtype={"key": str, "patient": str, "attr_sex": str})
    audit = metrics["subgroups"]
    weights = reference_patient_weights(table["patient"].tolist(), audit["resamples"], audit["seed"])
    for label in ("Pleural Effusion", "Support Devices", "Lung Opacity"):
        known = table[f"target_{label}"].notna().to_numpy()
        y, s = table[f"target_{label}"].fillna(0).to_numpy(), table[f"prob_{label}"].to_numpy()
        for sex in ("F", "M"):
            entry = audit["attributes"]["sex"]["groups"][sex]
            inside = (table["attr_sex"] == sex).to_numpy()
            assert math.isclose(entry["per_label"][label], roc_auc_score(y[inside & known], s[inside & known]), abs_tol=1e-12)
            resampled = weighted_auc(y, s, weights * (inside & known))
            np.testing.assert_allclose(entry["interval"]["per_label"][label], np.percentile(resampled, [2.5, 97.5]), rtol=0, atol=1e-12)
            rest = weighted_auc(y, s, weights * (~inside & known))
            np.testing.assert_allclose(entry["gap"]["per_label"][label]["interval"], np.percentile(resampled - rest, [2.5, 97.5]), rtol=0,
                                       atol=1e-12)
