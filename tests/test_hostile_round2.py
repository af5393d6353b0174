"""Hostile inputs, round 2 (issue 19 item 5): each case a careless or malicious user could hit, with its exit
code, one error line, no traceback, and what is left on disk (inputs and finished artifacts untouched)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from shard_servers import endless_server, http_server, silent_server
from test_hostile_inputs import make_images, one_error, prepare_args
from test_predict import write_dicom
from test_slurm import DEMO_CONFIG, TRAIN_FOLDS, fold_task_env, srun_call, stand_ins  # noqa: F401, F811 - stand_ins is a fixture
from trainer_utils import REPO, cpu_env, explain, fast_overrides, free_port, run_single

from cxrdist.cli import main
from cxrdist.data import manifest as manifest_module
from cxrdist.data.location import TIMEOUT_VARIABLE, redact
from cxrdist.data.datasets import load_manifest
from cxrdist.data.shards import read_shard
from cxrdist.data.spec import ImageSpec
from cxrdist.data.stream import StreamConfig, eval_loader
from cxrdist.errors import UserError


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m cxrdist ARGS` as a user runs it; the timeout is a guard against hangs, far above the expected time."""
    return subprocess.run([sys.executable, "-m", "cxrdist", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env or os.environ.copy())

# ---------------------------------------------------------------- data loss: no command writes over what it reads


@pytest.fixture
def experiment_copy(trained_experiment, tmp_path) -> Path:
    """A private copy of the trained two-fold experiment (cards and weights), free to damage."""
    runs = tmp_path / "runs" / "ens"
    for fold in ("fold-0", "fold-1"):
        shutil.copytree(trained_experiment / fold / "best", runs / fold / "best")
    return runs


@pytest.mark.parametrize("how", ["same name", "hard link"])
def test_folds_only_onto_the_label_csv_is_refused(tmp_path, capsys, how):
    csv = make_images(tmp_path)
    before = csv.read_bytes()
    target = csv
    if how == "hard link":
        target = tmp_path / "folds.csv"
        os.link(csv, target)
    assert main(["prepare", "--csv", str(csv), "--labels", "A,B", "--folds", "2", "--folds-only", str(target)]) == 2
    one_error(capsys, "--folds-only")
    assert csv.read_bytes() == before


def test_export_into_a_finished_model_directory_is_refused(experiment_copy, capsys):
    best = experiment_copy / "fold-0" / "best"
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    assert main(["export", "--runs", str(experiment_copy), "--format", "torchscript", "--out", str(best / "model")]) == 2
    one_error(capsys, "--out")
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before


def test_evaluate_into_a_finished_model_directory_is_refused(experiment_copy, capsys):
    best = experiment_copy / "fold-0" / "best"
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    assert main(["evaluate", "--runs", str(experiment_copy), "--out", str(best), "--workers", "0", "--resamples", "10"]) == 2
    one_error(capsys, "--out")
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_predict_onto_its_own_image_is_refused(trained_experiment, tmp_path, capsys, kind):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    scan = tmp_path / "scan.png"
    if kind == "png":
        Image.fromarray(pixels).save(scan)
    else:
        write_dicom(scan.with_suffix(".dcm"), pixels)
        scan = scan.with_suffix(".dcm")
    before = scan.read_bytes()
    assert main(["predict", "--runs", str(trained_experiment), "--images", str(tmp_path), "--out", str(scan), "--workers", "0"]) == 2
    one_error(capsys, "--out")
    assert scan.read_bytes() == before


# ---------------------------------------------------------------- silent wrong results: models and metrics of another dataset


def test_export_of_folds_trained_on_different_datasets_is_refused(experiment_copy, tmp_path, capsys):
    card_path = experiment_copy / "fold-1" / "best" / "model.json"
    card = json.loads(card_path.read_text())
    card["dataset"]["content_sha256"] = "0" * 64  # fold-1 trained on other shards with the same labels and layout
    card_path.write_text(json.dumps(card))
    out = tmp_path / "export" / "model.pt"
    assert main(["export", "--runs", str(experiment_copy), "--format", "torchscript", "--out", str(out)]) == 2
    one_error(capsys, "another dataset")
    assert not out.exists()


def test_export_with_metrics_of_another_label_set_is_refused(evaluated_experiment, tmp_path, capsys):
    runs, _ = evaluated_experiment
    metrics = json.loads((runs / "ensemble" / "metrics.json").read_text())
    metrics["labels"] = [f"Other {label}" for label in metrics["labels"]]
    foreign = tmp_path / "metrics.json"
    foreign.write_text(json.dumps(metrics))
    out = tmp_path / "export" / "model.pt"
    assert main(["export", "--runs", str(runs), "--format", "torchscript", "--out", str(out), "--metrics", str(foreign)]) == 2
    one_error(capsys, "labels")
    assert not out.exists()


# ---------------------------------------------------------------- secrets: no user:password or token in any output


SECRET_URL = "https://alice:s3cret-pw@data.example.org/cxr/shards?token=tok-9876"


def test_redact_masks_credentials_and_tokens_in_any_text():
    line = f"+ accelerate launch --multi_gpu cxrdist/train.py --config c.yaml data.shards={SECRET_URL} 'x=s3://k:v@b/p?X-Amz-Signature=abc'"
    shown = redact(line)
    assert not any(secret in shown for secret in ("s3cret-pw", "alice", "tok-9876", "X-Amz-Signature", "abc'"))
    assert "data.shards=https://data.example.org/cxr/shards " in shown and "x=s3://b/p'" in shown
    assert redact("no URL here: /data/shards") == "no URL here: /data/shards"


def test_a_shard_that_answers_404_is_named_without_its_credentials(synth_shards):
    with http_server(synth_shards) as (url, _handler):
        missing = url.replace("http://", "http://alice:s3cret-pw@") + "/fold-0/no-such-shard.tar?token=tok-9876"
        with pytest.raises(UserError) as err:
            list(read_shard(missing))
    assert "not found" in str(err.value) and "no-such-shard.tar" in str(err.value)
    assert "s3cret-pw" not in str(err.value) and "tok-9876" not in str(err.value)


def test_training_writes_credentials_nowhere_w_and_b_included(synth_shards, tmp_path):
    """A shard URL with a user:password, W&B offline: not in any output or any file (W&B's run files, whose metadata
    records the command line, included). (A query token names one object, not a shard directory: redact's test.)"""
    env = cpu_env(1, WANDB_MODE="offline", WANDB_DIR=tmp_path / "wandb-home", WANDB_SILENT="true")
    with http_server(synth_shards) as (url, _handler):
        secret = url.replace("http://", "http://alice:s3cret-pw@")
        args = fast_overrides(secret, tmp_path / "runs", **{"train.epochs": 1, "logging.wandb": "offline"})
        result = run_single(["--fold", "0", *args], env=env, timeout=600)
    assert result.returncode == 0, explain(result)
    assert list((tmp_path / "runs").rglob("offline-run-*/run-*.wandb")), "W&B wrote no run log"
    assert "s3cret-pw" not in result.stdout + result.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file() and b"s3cret-pw" in path.read_bytes()]
    assert not written, written


def test_slurm_fold_task_log_shows_no_credentials(stand_ins):  # noqa: F811 - the imported fixture
    env = fold_task_env(stand_ins, GPUS_PER_NODE=8)
    done = subprocess.run(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG), f"data.shards={SECRET_URL}"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accelerate launch" in done.stdout and "data.shards=https://data.example.org/cxr/shards" in done.stdout, done.stdout
    assert "s3cret-pw" not in done.stdout + done.stderr and "tok-9876" not in done.stdout + done.stderr
    _, launch = srun_call(stand_ins["record"])
    assert f"data.shards={SECRET_URL}" in launch  # the trainer itself still gets the real URL


def test_slurm_submitter_takes_an_output_directory_with_a_space(stand_ins, synth_shards, tmp_path):  # noqa: F811 - the imported fixture
    runs = tmp_path / "my runs"
    env = dict(stand_ins["env"], GPUS_PER_NODE="8", RUNS_DIR=str(runs))
    done = subprocess.run(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG), f"data.shards={synth_shards}"], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    array = (stand_ins["record"] / "sbatch.0.args").read_text().splitlines()
    assert f"--output={runs}/demo/slurm/fold-%a-%A_%a.out" in array and "--array=0-2" in array, array
    assert (runs / "demo" / "slurm").is_dir()


# ---------------------------------------------------------------- hangs and memory: every remote read is bounded


def test_verify_against_a_server_that_never_answers_ends_with_one_line(monkeypatch):
    with silent_server() as url:
        result = cli("verify", url, env={**os.environ, TIMEOUT_VARIABLE: "1"}, timeout=240)
    assert result.returncode == 2, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json" in lines[0] and "Timeout" in lines[0], result.stderr


def test_a_shard_stalling_mid_stream_during_evaluate_ends_with_one_line(evaluated_experiment, synth_shards, tmp_path):
    runs, _ = evaluated_experiment
    manifest_bytes = (synth_shards / "manifest.json").stat().st_size
    with http_server(synth_shards, cuts=-1, cut_after=manifest_bytes + 1, stall=True) as (url, _handler):
        result = cli("evaluate", "--runs", str(runs), "--shards", url, "--out", str(tmp_path / "ens"), "--workers", "0",
                     "--resamples", "10", env={**os.environ, TIMEOUT_VARIABLE: "3"}, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, explain(result)
    errors = [line for line in result.stderr.strip().splitlines() if "error:" in line]  # the others: the progress bar
    assert len(errors) == 1 and "unreadable after 5 attempts" in errors[0] and ".tar" in errors[0], result.stderr
    assert not (tmp_path / "ens").exists()


def test_an_endless_manifest_is_refused_after_a_bounded_read(monkeypatch):
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 2**20)
    with endless_server(limit=64 * 2**20) as (url, handler):
        with pytest.raises(UserError, match="larger than 1 MiB"):
            load_manifest(url)
    assert handler.sent < 16 * 2**20  # the reader stopped, it did not take the whole body


def test_an_unreachable_server_is_said_to_be_unreachable():
    result = cli("verify", f"http://127.0.0.1:{free_port()}/shards", env={**os.environ, TIMEOUT_VARIABLE: "1"}, timeout=240)
    assert result.returncode == 2, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "not found" not in lines[0], result.stderr


# ---------------------------------------------------------------- silent wrong results in the data


def rewrite_first_label(shard: Path) -> None:
    """The shard with the same samples, one label of its first sample changed: same count, another sha256."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    first_json = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".json"))
    meta = json.loads(members[first_json][1])
    meta["labels"][0] = 1 if meta["labels"][0] != 1 else 0
    body = json.dumps(meta).encode()
    member = members[first_json][0]
    member.size = len(body)
    members[first_json] = (member, body)
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


def test_a_served_shard_other_than_the_manifests_is_refused(synth_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    manifest = load_manifest(shards)
    swapped = manifest.split("fold-0").shards[0]
    rewrite_first_label(shards / swapped.file)
    with http_server(shards) as (url, _handler):
        remote = load_manifest(url)
        loader = eval_loader(url, remote, ["fold-0"], StreamConfig(image=ImageSpec(32), batch_size=8, workers=0), 0, 1)
        with pytest.raises(UserError, match="sha256") as err:
            for _batch in loader:
                pass
    assert swapped.file in str(err.value)


def test_one_image_under_two_paths_through_a_hard_link_is_refused(tmp_path, capsys):
    csv = make_images(tmp_path)
    images = tmp_path / "images"
    table = pd.read_csv(csv, dtype=str)
    os.link(images / table.loc[0, "path"], images / "alias.png")
    table.loc[1, "path"] = "alias.png"
    table.to_csv(csv, index=False)
    assert main(prepare_args(csv, images, tmp_path / "out")) == 2
    one_error(capsys, "same file")
    assert not (tmp_path / "out").exists()


def test_folds_from_a_file_whose_folds_the_csv_does_not_all_fill_is_refused(tmp_path, capsys):
    csv = make_images(tmp_path, n_patients=18)
    folds = tmp_path / "folds.csv"
    assert main(["prepare", "--csv", str(csv), "--labels", "A,B", "--folds", "3", "--folds-only", str(folds)]) == 0
    assignment = pd.read_csv(folds, dtype=str)
    in_fold_1 = set(assignment.loc[assignment["split"] == "fold-1", "path"])
    table = pd.read_csv(csv, dtype=str)
    table[~table["path"].isin(in_fold_1)].to_csv(csv, index=False)  # a CSV without fold-1's images
    capsys.readouterr()
    assert main(prepare_args(csv, tmp_path / "images", tmp_path / "out", "--folds-from", str(folds))) == 2
    one_error(capsys, "fold-1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("written", ["NaN", "nan", "None", "NA"])
def test_patient_ids_written_as_missing_values_are_refused(tmp_path, capsys, written):
    csv = make_images(tmp_path)
    table = pd.read_csv(csv, dtype=str)
    table.loc[[0, 5, 9], "patient"] = written  # three patients' images would become one patient
    table.to_csv(csv, index=False)
    assert main(["prepare", "--csv", str(csv), "--labels", "A,B", "--folds", "2", "--folds-only", str(tmp_path / "f.csv")]) == 2
    one_error(capsys, "patient")
    assert not (tmp_path / "f.csv").exists()


# ---------------------------------------------------------------- settings that pass validation and crash later


@pytest.mark.parametrize("override", ["train.log_every=0", "seed=-1", "fold=-1", "model.drop_rate=1.5", "model.drop_path_rate=-0.1",
                                      "model.refine.alpha=nan", "model.refine.l1=inf", "loss.clip=1.5", "loss.eps=0",
                                      "loss.pos_weight=[1,-2]", "data.img_size=0", "data.max_corrupt_fraction=2",
                                      "train.max_bad_steps=0", "train.eval_every=-1", "model.in_chans=2"])
def test_bad_settings_are_one_line_where_the_config_is_read(tmp_path, override):
    result = cli("info", "--config", str(DEMO_CONFIG), "--no-manifest", override)
    assert result.returncode == 2, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_a_pos_weight_of_the_wrong_length_stops_training_before_the_first_step(synth_shards, tmp_path):
    result = run_single(["--fold", "0", *fast_overrides(synth_shards, tmp_path, **{"loss.pos_weight": "[1.0,2.0]"})],
                        timeout=300, env=cpu_env(1))
    assert result.returncode == 2, explain(result)
    assert "loss.pos_weight has 2 values" in result.stderr and "Traceback" not in result.stderr, explain(result)
    assert not list(tmp_path.rglob("checkpoint*"))


@pytest.mark.parametrize("text, needle", [("data: {shards: [\n", "not valid YAML"), ("- 1\n- 2\n", "mapping"), ("just text\n", "mapping")])
def test_malformed_or_non_mapping_configs_are_one_line(tmp_path, text, needle):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    result = cli("info", "--config", str(config), "--no-manifest")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, explain(result)


@pytest.mark.parametrize("text, needle", [("[1, 2]", "expected an object"), ('"manifest"', "expected an object"), ("\xff\xfe", "not text")])
def test_non_mapping_manifests_are_one_line(synth_shards, tmp_path, text, needle):
    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    (shards / "manifest.json").write_bytes(text.encode("latin-1"))
    result = cli("verify", str(shards))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, explain(result)


# ---------------------------------------------------------------- output paths: existing files, read-only directories


def test_report_and_compare_to_an_existing_file_are_one_line(evaluated_experiment, tmp_path, capsys):
    runs, _ = evaluated_experiment
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert main(["report", "--runs", str(runs), "--out", str(taken)]) == 2
    one_error(capsys, "not a directory")
    assert main(["compare", str(runs), str(runs), "--out", str(taken), "--resamples", "10"]) == 2
    one_error(capsys, "not a directory")
    assert taken.read_text() == "mine"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write into, root included (the tests run as root: chattr +i, immutable)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_writing_into_a_read_only_directory_is_one_line(read_only_dir, tmp_path, capsys):
    csv = make_images(tmp_path)
    out = read_only_dir / "folds.csv"
    assert main(["prepare", "--csv", str(csv), "--labels", "A,B", "--folds", "2", "--folds-only", str(out)]) == 2
    one_error(capsys, str(read_only_dir))
    assert main(["synth", "--out", str(read_only_dir / "synth"), "--n", "4", "--size", "32"]) == 2
    one_error(capsys, str(read_only_dir))
    assert list(read_only_dir.iterdir()) == []
