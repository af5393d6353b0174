"""One vocabulary end to end, and external results that cannot land on each other (issue 28 items 1 and 5, issue 31).

Real NIH ChestX-ray14 table rows (tests/nih_tables.py: patients 1-30 to train, 31-60 as other sites, in the 2017 and the
2020 spelling of the table), synthetic images under their names, `--source nih` shards. Two models are really trained
(test_resnet, 64 px, 1 epoch, fold 0) from an HTTP server that wants basic auth: one on the NIH table alone (it keeps
NIH's names, Effusion and Pleural_Thickening), one on NIH plus a CheXpert-named dataset under a `data.vocabulary` in
another order than the union. Every evaluation runs `cxrdist evaluate` in a real process, with the credentials in a
netrc file (the model cards record the URL without them)."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nih_tables import draw_images, prepare_nih, rows
from shard_servers import Handler, serving
from test_datasets import prepare_synthetic
from trainer_utils import DEMO_CONFIG, REPO, TRAIN, cpu_env, explain, fast_overrides, label_aucs

USER, SECRET = "reader", "n1h-s3cret-pw"


class NeedsCredentials(Handler):
    """The static server of the remote-shard tests, answering 401 to a request without the right basic auth."""

    def authorised(self) -> bool:
        if self.headers.get("Authorization") == "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode():
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="shards"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_GET(self) -> None:
        if self.authorised():
            super().do_GET()

    def do_HEAD(self) -> None:
        if self.authorised():
            super().do_HEAD()


@contextmanager
def server_with_credentials(directory: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(NeedsCredentials, directory=str(directory)))
    with serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"


def train(shards: str, runs: Path, experiment: str, *extra: str) -> subprocess.Popen:
    args = fast_overrides(shards, runs, **{"train.epochs": 1, "experiment": experiment})
    return subprocess.Popen([sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), "--fold", "0", *args, *extra], env=cpu_env(1),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("vocabulary")
    served = base / "served"
    nih = prepare_nih(served / "nih", range(1, 31), "2017", test_patients=range(26, 31))
    site = prepare_synthetic(served / "site", seed=5, n=100, folds=2)  # CheXpert's names, "No Finding" included
    from cxrdist.data.datasets import open_datasets

    union = open_datasets([{"location": str(nih), "name": "nih"}, {"location": str(site), "name": "site"}])[1].labels
    vocabulary = sorted(union)  # data.vocabulary: the same names in another order than the union's
    world = {"base": base, "runs": base / "runs", "nih": nih, "site": site, "vocabulary": vocabulary,
             "external": prepare_nih(base / "ext", range(31, 61), "2020", test_patients=range(31, 41), seed=1),
             "site_c": prepare_nih(base / "siteC", range(31, 61), "2020", seed=2),
             "site_d": prepare_nih(base / "siteD", range(41, 61), "2020", seed=3),
             "normal": prepare_unscorable(base / "normal")}
    world["netrc"] = base / "netrc"
    world["netrc"].write_text(f"machine 127.0.0.1 login {USER} password {SECRET}\n")
    with server_with_credentials(served) as url:
        remote = url.replace("http://", f"http://{USER}:{SECRET}@")
        world["url"] = url
        both = json.dumps([{"location": f"{remote}/nih/shards", "name": "nih"}, {"location": str(site), "name": "site"}])
        procs = [train(f"{remote}/nih/shards", world["runs"], "nih"),
                 train(both, world["runs"], "vocab", f"data.vocabulary={json.dumps(vocabulary)}")]
        logs = [p.communicate(timeout=900)[0] for p in procs]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-4000:]
        yield world


def prepare_unscorable(root: Path) -> Path:
    """NIH's 'No Finding' rows as a generic CSV whose Effusion and Atelectasis (labels the NIH model has) are never positive
    and whose only label with both classes, Support Devices, the model lacks: prepare accepts it (a label can be scored
    in every split), but no label the model shares with it can."""
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare

    lines = [line for line in rows(range(31, 61)) if line.split(",")[1] == "No Finding"]
    draw_images(root / "images", lines, seed=4)
    table = pd.DataFrame({"path": [line.split(",")[0] for line in lines], "patient": [line.split(",")[3] for line in lines],
                          "Effusion": 0, "Atelectasis": 0, "Support Devices": [i % 2 for i in range(len(lines))]})
    table.to_csv(root / "labels.csv", index=False)
    prepare(PrepareOptions(source="csv", csv=root / "labels.csv", images=root / "images", out=root / "shards", folds=2, test_fraction=0.2,
                           max_size=64, fmt="png", samples_per_shard=40, workers=1, labels="Effusion,Atelectasis,Support Devices", seed=4,
                           progress=False))
    return root / "shards"


def evaluate(runs: Path, *args: str, netrc: Path | None = None) -> subprocess.CompletedProcess:
    env = cpu_env(1)
    env.pop("NETRC", None)
    if netrc is not None:
        env["NETRC"] = str(netrc)
    return subprocess.run([sys.executable, "-m", "cxrdist", "evaluate", "--runs", str(runs), "--resamples", "20", "--workers", "0", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=env)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a refusal (progress bars and notes before it are not errors)."""
    lines = [line for line in result.stderr.strip().splitlines() if "error:" in line]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, explain(result)
    return lines[0]


def external_folders(runs: Path) -> list[Path]:
    return sorted(path for path in (runs / "external").iterdir()) if (runs / "external").is_dir() else []


def nih_targets(lines: list[str], finding: str) -> dict[str, float]:
    return {line.split(",")[0]: float(finding in line.split(",")[1].split("|")) for line in lines}


# ---------------------------------------------------------------- item 1: one vocabulary end to end


def test_a_model_of_one_nih_table_scores_effusion_and_pleural_thickening_on_another_nih_table(world):
    """Trained on the 2017 spelling (names kept: Effusion, Pleural_Thickening), scored on the 2020 spelling: matched through
    the harmonised names the card records, so no label is dropped; the console line names dataset, split and labels scored."""
    runs = world["runs"] / "nih"
    card = json.loads((runs / "fold-0" / "best" / "model.json").read_text())
    # the training shards given by their local path (`--shards`, as for shards that moved): no credentials needed here
    done = evaluate(runs, "--external", str(world["external"]), "--split", "all", "--shards", str(world["nih"]))
    assert done.returncode == 0, explain(done)
    assert "dropped" not in done.stderr, done.stderr
    [out] = external_folders(runs)
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions.csv", dtype={"key": str, "path": str})
    lines = rows(range(31, 61))
    for finding in ("Effusion", "Pleural_Thickening"):
        truth = nih_targets(lines, finding)
        assert table[f"target_{finding}"].tolist() == [truth[Path(path).name] for path in table["path"]]  # scored, never blank
        assert metrics["ensemble"]["per_label"][finding] is not None
    scored = [label for label in card["labels"] if table[f"target_{label}"].dropna().nunique() == 2]
    assert metrics["ensemble"]["macro_auc"] == pytest.approx(float(np.mean(label_aucs(table, scored))), abs=1e-12)
    assert card["labels"][2] == "Effusion" and card["vocabulary"]["harmonised"][2] == "Pleural Effusion"
    assert card["vocabulary"]["harmonised"][-1] == "No Finding (NIH)" and card["vocabulary"]["origin"] == "dataset"
    assert metrics["external_dataset"]["not_in_model"] == [] and len(table) == len(lines)
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(f"external dataset shards ({world['external']}, id {metrics['external_dataset']['identity']}), split all: ")
    assert f"over {len(scored)} labels (of the model's 15)" in line and str(out) in line


def test_nih_no_finding_is_not_scored_against_a_chexpert_style_no_finding(world):
    """The CheXpert-named dataset's Pleural Effusion is the NIH model's Effusion; its No Finding is another definition."""
    runs = world["runs"] / "nih"
    done = evaluate(runs, "--external", str(world["site"]), "--split", "all", "--shards", str(world["nih"]))
    assert done.returncode == 0, explain(done)
    [out] = [path for path in external_folders(runs) if json.loads((path / "metrics.json").read_text()).get("shards")[0]["location"]
             == str(world["site"])]
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions.csv")
    assert table["target_No Finding"].isna().all() and metrics["ensemble"]["per_label"]["No Finding"] is None
    assert table["target_Effusion"].notna().sum() > 80 and metrics["ensemble"]["per_label"]["Effusion"] is not None  # blank: uncertain
    assert "No Finding" in metrics["external_dataset"]["not_in_model"]
    assert "the model has no" in done.stdout and "No Finding" in done.stdout.strip().splitlines()[-1]


def test_a_model_trained_with_data_vocabulary_on_a_remote_and_a_local_dataset_evaluates(world):
    runs = world["runs"] / "vocab"
    card = json.loads((runs / "fold-0" / "best" / "model.json").read_text())
    assert card["labels"] == world["vocabulary"] and card["vocabulary"]["origin"] == "data.vocabulary"
    internal = evaluate(runs, netrc=world["netrc"])
    assert internal.returncode == 0, explain(internal)
    metrics = json.loads((runs / "ensemble" / "metrics.json").read_text())
    assert metrics["labels"] == world["vocabulary"] and set(metrics["per_dataset"]) == {"nih", "site", "pooled"}
    external = evaluate(runs, "--external", str(world["site_c"]), "--split", "all", netrc=world["netrc"])
    assert external.returncode == 0, explain(external)
    [out] = external_folders(runs)
    assert json.loads((out / "metrics.json").read_text())["ensemble"]["per_label"]["Pleural Effusion"] is not None

    no_credentials = one_line(evaluate(runs, "--out", str(world["base"] / "elsewhere")))  # the card names a remote and a local dataset
    assert "HTTP 401" in no_credentials and "netrc" in no_credentials and str(world["url"].split("//")[1].split(":")[0]) in no_credentials
    assert not (world["base"] / "elsewhere").exists()


def test_credentials_are_asked_for_in_one_line_and_never_written(world):
    runs = world["runs"] / "nih"
    refused = one_line(evaluate(runs, "--external", str(world["site_d"]), "--split", "all"))
    assert "HTTP 401" in refused and "netrc" in refused and SECRET not in refused
    given = evaluate(runs, "--shards", f"{world['url'].replace('http://', f'http://{USER}:{SECRET}@')}/nih/shards", "--out",
                     str(world["base"] / "with-url"))  # or, as training took them, in the URL
    assert given.returncode == 0 and SECRET not in given.stdout + given.stderr, explain(given)
    written = [path for path in world["runs"].rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert not written, written


# ---------------------------------------------------------------- item 5 and issue 31: where external results go


def test_external_results_keep_their_split_and_their_dataset(world):
    runs = world["runs"] / "nih"
    first = evaluate(runs, "--external", str(world["external"]), "--split", "all", netrc=world["netrc"])
    second = evaluate(runs, "--external", str(world["external"]), "--split", "test", netrc=world["netrc"])
    assert first.returncode == 0 and second.returncode == 0, explain(first) + explain(second)
    found = [json.loads((path / "metrics.json").read_text()) for path in external_folders(runs)]
    results = [m for m in found if m["external_dataset"]["location"] == str(world["external"])]
    assert sorted(m["split"] for m in results) == ["all", "test"]  # the test split did not replace all of it
    sizes = {m["split"]: m["num_samples"] for m in results}
    assert sizes == {"all": len(rows(range(31, 61))), "test": len(rows(range(31, 41)))}
    assert "split test" in second.stdout.strip().splitlines()[-1]

    # two locations that both end in /shards (siteC/shards, siteD/shards): two results, neither over the other
    c = evaluate(runs, "--external", str(world["site_c"]), "--split", "all", netrc=world["netrc"])
    d = evaluate(runs, "--external", str(world["site_d"]), "--split", "all", netrc=world["netrc"])
    assert c.returncode == 0 and d.returncode == 0, explain(c) + explain(d)
    by_location = {json.loads((p / "metrics.json").read_text())["external_dataset"]["location"]: p for p in external_folders(runs)}
    assert {str(world["site_c"]), str(world["site_d"])} <= set(by_location)
    assert by_location[str(world["site_c"])] != by_location[str(world["site_d"])]
    assert all(p.name.startswith("shards-") for p in (by_location[str(world["site_c"])], by_location[str(world["site_d"])]))
    assert json.loads((by_location[str(world["site_d"])] / "metrics.json").read_text())["num_samples"] == len(rows(range(41, 61)))


def test_an_external_result_is_never_written_over_the_internal_one_or_another(world):
    runs = world["runs"] / "nih"
    internal = runs / "ensemble"
    refused = one_line(evaluate(runs, "--external", str(world["site_c"]), "--split", "all", "--out", str(internal), netrc=world["netrc"]))
    assert "internal evaluation" in refused and not internal.exists()
    done = evaluate(runs, "--external", str(world["site_c"]), "--split", "all", "--out", str(world["base"] / "mine"), netrc=world["netrc"])
    assert done.returncode == 0, explain(done)
    before = (world["base"] / "mine" / "metrics.json").read_bytes()
    other = one_line(evaluate(runs, "--external", str(world["site_d"]), "--split", "all", "--out", str(world["base"] / "mine"),
                              netrc=world["netrc"]))
    assert "holds the external result" in other and (world["base"] / "mine" / "metrics.json").read_bytes() == before
    inside = one_line(evaluate(runs, "--split", "fold-0", "--out", str(world["base"] / "mine"), netrc=world["netrc"]))
    assert "holds the external result" in inside and (world["base"] / "mine" / "metrics.json").read_bytes() == before


def test_an_external_dataset_with_no_scorable_label_is_one_line(world):
    """Every label both share (Pleural Effusion, Atelectasis) has a single class; nothing to score, nothing written."""
    runs = world["runs"] / "nih"
    before = set(external_folders(runs))
    line = one_line(evaluate(runs, "--external", str(world["normal"]), "--split", "all", netrc=world["netrc"]))
    assert "nothing to score" in line and "never positive: Atelectasis, Effusion" in line  # the model's own names
    assert set(external_folders(runs)) == before
