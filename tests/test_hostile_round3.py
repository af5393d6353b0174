"""Hostile inputs, round 3 (issue 31): each case a careless or hostile user could hit over what wave 3 added, and the
round-2 cases that still fell short, with its exit code, one error line, no traceback, and what is left on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from shard_servers import S3_ENV, counting_silent_server, http_server
from test_datasets import prepare_synthetic
from test_hostile_inputs import make_images, one_error, prepare_args
from trainer_utils import DEMO_CONFIG, REPO, cpu_env, explain, fast_overrides, run_single

from cxrdist.cli import build_parser, main
from cxrdist.data.datasets import load_manifest
from cxrdist.data.location import ATTEMPTS, TIMEOUT_VARIABLE, join
from cxrdist.errors import UserError
from cxrdist.train import parse_args as parse_train_script_args

SECRET = "hunter2-do-not-print"


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m cxrdist ARGS` as a user runs it; the timeout is a guard against hangs, far above the expected time."""
    return subprocess.run([sys.executable, "-m", "cxrdist", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env or os.environ.copy())


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://reader:{SECRET}@", 1)


# ---------------------------------------------------------------- secrets: the "to resume" line


@pytest.fixture(scope="module")
def two_small_datasets(tmp_path_factory) -> Path:
    """Two prepared synthetic hospitals under one folder (served over HTTP as /a and /b)."""
    base = tmp_path_factory.mktemp("two-datasets")
    for name, seed in (("a", 3), ("b", 5)):
        prepare_synthetic(base / name, seed=seed, n=80, folds=2)
    return base


def stop_after_first_steps(command: list[str], metrics: Path) -> subprocess.CompletedProcess:
    """Run `command`, Ctrl-C it once its trainer has logged steps, and return what it said."""
    env = {**cpu_env(1), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3000):
            if metrics.exists() and metrics.read_text().count("\n") >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "lodo"])
def test_the_resume_line_shows_no_password_of_data_shards(two_small_datasets, tmp_path, command):
    with http_server(two_small_datasets) as (url, _handler):
        secret_url = with_credentials(url)
        if command == "train":
            shards, metrics = f"{secret_url}/a/shards", tmp_path / "runs" / "demo" / "fold-0" / "metrics.jsonl"
        else:
            shards = json.dumps([{"location": f"{secret_url}/{name}/shards", "name": name} for name in ("a", "b")])
            metrics = tmp_path / "runs" / "demo-without-a" / "fold-0" / "metrics.jsonl"
        overrides = fast_overrides(shards, tmp_path / "runs", **{"train.epochs": 50, "data.workers": 0})
        extra = ["--workers", "0"] if command == "lodo" else []
        done = stop_after_first_steps([sys.executable, "-m", "cxrdist", command, "--config", str(DEMO_CONFIG), "--processes", "1",
                                       *extra, *overrides], metrics)
    assert done.returncode == 75, (done.stdout[-3000:], done.stderr[-3000:])
    [line] = [x for x in done.stderr.splitlines() if "to resume, run the same command again: " in x]
    assert f"{url}/a/shards" in line and SECRET not in line and "reader:" not in line, line
    assert SECRET not in done.stdout + done.stderr


# ---------------------------------------------------------------- remote reads: one round of attempts, the right words


@pytest.mark.parametrize("scheme", ["http", "s3"])
def test_a_silent_server_costs_one_round_of_single_requests(scheme):
    """The documented bound: ATTEMPTS attempts, each ONE request waiting CXRDIST_NET_TIMEOUT_S (not fsspec's HEAD and GET
    first, nor botocore's and s3fs's own retries under ours: 10 and 125 requests before)."""
    with counting_silent_server() as (url, accepted):
        env = {**os.environ, TIMEOUT_VARIABLE: "1"}
        if scheme == "s3":
            env.update({**S3_ENV, "AWS_ENDPOINT_URL_S3": url})
        result = cli("verify", f"{url}/shards" if scheme == "http" else "s3://bucket/shards", env=env, timeout=900)
        requests = len(accepted)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"/shards/manifest.json: unreadable after {ATTEMPTS} attempts (" in line and "Timeout" in line, line
    assert requests == ATTEMPTS, f"{requests} requests to a silent server, not one per attempt ({ATTEMPTS})"


def test_a_url_with_a_query_token_reads_every_file_with_it(synth_shards):
    """A pre-signed URL: files are joined to the path, before the query (not appended after it: 'not valid JSON')."""
    with http_server(synth_shards.parent, token="t0ken") as (url, _handler):
        result = cli("verify", f"{url}/shards?token=t0ken")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"match {url}/shards/manifest.json") and "t0ken" not in result.stdout + result.stderr


def test_join_keeps_the_query_after_the_path():
    assert join("https://h/data/shards?X-Sig=abc&e=1", "fold-0/shard-000000.tar") == "https://h/data/shards/fold-0/shard-000000.tar?X-Sig=abc&e=1"
    assert join("s3://bucket/shards/", "manifest.json") == "s3://bucket/shards/manifest.json"


@pytest.mark.parametrize("status, words", [(500, "the server failed (HTTP 500) after 5 attempts"),
                                           (403, "refuses the request (HTTP 403: credentials missing or wrong)")])
def test_a_failing_existence_check_is_not_called_missing(synth_shards, status, words):
    with http_server(synth_shards, tar_status=status) as (url, _handler):
        result = cli("verify", url, env={**os.environ, TIMEOUT_VARIABLE: "5"})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert ".tar: " in line and words in line and "missing" not in line.replace("credentials missing", ""), line


# ---------------------------------------------------------------- the command line: numbers checked first, overrides anywhere


@pytest.mark.parametrize("args, needle", [
    (["evaluate", "--runs", "runs/x", "--resamples", "-5"], "argument --resamples: '-5': expected a whole number >= 0"),
    (["evaluate", "--runs", "runs/x", "--batch-size", "0"], "argument --batch-size: '0'"),
    (["lodo", "--config", "c.yaml", "--resamples", "-5"], "argument --resamples"),  # before any fold is trained
    (["lodo", "--config", "c.yaml", "--workers", "-1"], "argument --workers"),
    (["train", "--config", "c.yaml", "--processes", "0"], "argument --processes: '0': expected a whole number >= 1"),
    (["predict", "--runs", "runs/x", "--images", "x.png", "--cam-threshold", "nan"], "argument --cam-threshold: 'nan'"),
    (["predict", "--runs", "runs/x", "--images", "x.png", "--cam-top", "0"], "argument --cam-top"),
    (["compare", "a", "b", "--resamples", "1"], "argument --resamples: '1': expected a whole number >= 2"),
    (["prepare", "--csv", "l.csv", "--test-fraction", "1.5"], "argument --test-fraction: '1.5': expected a number in [0, 1)"),
    (["synth", "--out", "o", "--planted-coupling", "inf"], "argument --planted-coupling"),
])
def test_numeric_options_are_checked_as_they_are_read(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"cxrdist {args[0]}: error: ") and needle in line and line.endswith(f"(see `cxrdist {args[0]} --help`)"), line
    assert list(tmp_path.iterdir()) == []  # nothing done


@pytest.mark.parametrize("command", ["train", "lodo", "info"])
def test_overrides_may_come_between_options(command):
    args = build_parser().parse_args([command, "a=1", "--config", "c.yaml", "b=2", "--processes" if command != "info" else "--no-manifest",
                                      *(["3"] if command != "info" else []), "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"] and args.config == Path("c.yaml")
    script = parse_train_script_args(["--config", "c.yaml", "a=1", "--fold", "0", "b=2"])
    assert script.overrides == ["a=1", "b=2"] and script.fold == 0


def test_info_applies_overrides_on_both_sides_of_an_option(tmp_path):
    result = cli("info", "--config", str(DEMO_CONFIG), "experiment=between", "--no-manifest", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\t")[:2] == ["between", str(tmp_path)]


def test_an_unknown_option_names_the_subcommand_whose_help_lists_the_options(capsys):
    assert main(["evaluate", "--runs", "r", "--no-such"]) == 2
    assert capsys.readouterr().err.strip() == "cxrdist evaluate: error: unrecognized arguments: --no-such (see `cxrdist evaluate --help`)"


# ---------------------------------------------------------------- a disk that fills while the trainer writes


@contextmanager
def small_filesystem(where: Path, size: int):
    """A real file system of `size` bytes (tmpfs, mounted as root) at `where`; the test skips where none can be made."""
    where.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small file system needs root (mount -t tmpfs)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def run_settings(shards: Path, out: Path, epochs: int) -> list[str]:
    return fast_overrides(shards, out, **{"train.epochs": epochs, "train.log_every": 1000, "experiment": "full"})


@pytest.fixture(scope="module")
def one_epoch_run(synth_shards, tmp_path_factory) -> Path:
    """output_dir of a run trained for one epoch (a checkpoint and a best model), to copy onto a small file system."""
    out = tmp_path_factory.mktemp("one-epoch")
    done = run_single([*run_settings(synth_shards, out, epochs=1)])
    assert done.returncode == 0, explain(done)
    return out


def fill_to(directory: Path, free: int) -> None:
    """A ballast file that leaves `free` bytes of the file system of `directory` available."""
    ballast = shutil.disk_usage(directory).free - free
    with open(directory / "ballast", "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * ballast)


@pytest.mark.slow
@pytest.mark.parametrize("room, fails_on", [(0.6, "checkpoint"), (12 * 1024, "val_predictions.csv")])
def test_a_full_disk_while_the_trainer_writes_is_one_line_and_leaves_nothing_half_written(one_epoch_run, synth_shards, tmp_path,
                                                                                        room, fails_on):
    """Resumed for a second epoch on a file system with room for its evaluation but not its checkpoint (room: a
    fraction of one checkpoint's bytes), or not even for its validation predictions (room: bytes)."""
    from cxrdist.training.checkpoint import check_checkpoint, list_checkpoints

    with small_filesystem(tmp_path / "disk", size=32 << 20) as disk:
        shutil.copytree(one_epoch_run, disk / "runs")
        run = disk / "runs" / "full" / "fold-0"
        [first] = list_checkpoints(run)
        one_checkpoint = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
        fill_to(disk, int(room * one_checkpoint) if isinstance(room, float) else room)
        done = run_single([*run_settings(synth_shards, disk / "runs", epochs=2)])
        left_behind = [p.name for p in run.rglob(".*") if p.name != ".lock"]
        checkpoints, state = list_checkpoints(run), check_checkpoint(first)
    assert done.returncode == 2, explain(done)
    [line] = [x for x in done.stderr.splitlines() if "error" in x.lower()]
    assert line.startswith("cxrdist train: error: ") and fails_on in line and "No space left on device" in line, line
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert left_behind == [] and checkpoints == [first] and state.epoch == 1  # no partial file; the previous checkpoint whole


def test_a_full_disk_while_evaluate_writes_keeps_the_previous_evaluation_whole(evaluated_experiment, tmp_path, capsys):
    runs, _ = evaluated_experiment
    with small_filesystem(tmp_path / "disk", size=4 << 20) as disk:
        out = disk / "ensemble"
        assert main(["evaluate", "--runs", str(runs), "--out", str(out), "--workers", "0", "--resamples", "10"]) == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        fill_to(disk, (out / "metrics.json").stat().st_size * 3 // 4)  # room for each file but metrics.json, one at a time
        capsys.readouterr()
        code = main(["evaluate", "--runs", str(runs), "--out", str(out), "--workers", "0", "--resamples", "10", "--no-tta"])
        after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert code == 2
    [line] = [x for x in capsys.readouterr().err.strip().splitlines() if "error" in x]  # the others: the missing fold's warning
    assert line.startswith("cxrdist evaluate: error: ") and "No space left on device" in line and str(out) in line, line
    assert after == before  # the previous predictions, probabilities and metrics, together; no temporary file


# ---------------------------------------------------------------- output paths: links, devices, names that cannot exist


@pytest.fixture
def data(tmp_path):
    return tmp_path, make_images(tmp_path), tmp_path / "images"


def test_re_prepare_through_a_symlinked_out_replaces_the_dataset_it_points_at(data, capsys):
    root, csv, images = data
    (root / "store").mkdir()
    link = root / "current"
    link.symlink_to(root / "store" / "shards")
    assert main(prepare_args(csv, images, link)) == 0
    assert main(prepare_args(csv, images, link, "--seed", "1")) == 0
    assert link.is_symlink() and json.loads((root / "store" / "shards" / "manifest.json").read_text())["seed"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["current", "images", "labels.csv", "store"]  # no .current.old left
    assert load_manifest(link).seed == 1


@pytest.mark.parametrize("target, needle", [
    ("{root}/pipe", "not a regular file"),  # a FIFO, as /dev/null or /dev/stdout: an atomic write would rename a file over it
    ("/proc/cxrdist-nowhere/folds.csv", "cannot write there"),
    ("{root}/" + "x" * 300 + "/folds.csv", "File name too long"),
    ("", "is a directory; give a file name such as folds.csv"),
])
def test_fold_files_that_cannot_be_written_are_one_line_before_any_work(data, capsys, target, needle):
    root, csv, images = data
    os.mkfifo(root / "pipe")
    assert main(["prepare", "--csv", str(csv), "--folds", "2", "--labels", "A,B", "--folds-only", target.format(root=root)]) == 2
    line = one_error(capsys, needle)
    assert "fold-0" not in line and stat.S_ISFIFO(os.stat(root / "pipe").st_mode)  # refused before the folds were computed


def test_prepare_into_an_unwritable_place_is_said_before_the_images_are_read(data, capsys):
    root, csv, images = data
    assert main(prepare_args(csv, images, root / "labels.csv" / "shards")) == 2
    one_error(capsys, "--out")
    assert sorted(p.name for p in root.iterdir()) == ["images", "labels.csv"]


@pytest.mark.slow
def test_training_into_an_unwritable_output_dir_is_one_line(synth_shards, tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    done = run_single([*fast_overrides(synth_shards, tmp_path / "runs", **{"train.epochs": 1})])
    assert done.returncode == 2, explain(done)
    [line] = [x for x in done.stderr.splitlines() if "error" in x.lower()]
    assert line.startswith("cxrdist train: error: ") and str(tmp_path / "runs") in line and "Not a directory" in line, line
    assert "Traceback" not in done.stderr


def test_predict_says_a_cam_folder_that_is_a_file_before_the_inference(trained_experiment, tmp_path, capsys):
    image = make_png(tmp_path / "x.png")
    (tmp_path / "cams").write_text("not a folder")
    assert main(["predict", "--runs", str(trained_experiment), "--images", str(image), "--out", str(tmp_path / "p.csv"),
                 "--cam", str(tmp_path / "cams"), "--workers", "0"]) == 2
    one_error(capsys, "--cam")
    assert not (tmp_path / "p.csv").exists()  # refused before the inference, so nothing written


def make_png(path: Path) -> Path:
    from PIL import Image

    Image.new("L", (64, 64), 128).save(path)
    return path


# ---------------------------------------------------------------- settings from outside the config: W&B's variable, launch files


@pytest.mark.parametrize("command", [["evaluate", "--runs", "runs/x"], ["train", "--config", "c.yaml"]])
def test_a_garbage_wandb_mode_is_one_line_before_any_work(monkeypatch, tmp_path, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "garbage")
    assert main(command) == 2
    one_error(capsys, "WANDB_MODE='garbage'")


def test_the_trainer_says_a_garbage_wandb_mode_in_one_line(synth_shards, tmp_path):
    done = run_single([*fast_overrides(synth_shards, tmp_path / "runs", **{"train.epochs": 1, "logging.wandb": "auto"})],
                      env=cpu_env(1, WANDB_MODE="garbage"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, explain(done)
    assert "cxrdist train: error: WANDB_MODE='garbage'" in done.stderr


@pytest.mark.parametrize("text", ["garbage: [unclosed\n", "just a string\n", "distributed_type: NONSENSE\nnum_processes: 1\n", "\0\1"])
def test_a_garbage_launch_config_is_one_line_before_launching(tmp_path, capsys, text):
    (tmp_path / "launch.yaml").write_text(text)
    assert main(["train", "--config", str(DEMO_CONFIG), "--launch-config", str(tmp_path / "launch.yaml"), f"output_dir={tmp_path}/runs"]) == 2
    one_error(capsys, "not an accelerate config file")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- label maps, vocabularies, names: one line, never a silent label


def open_two(datasets: Path, vocabulary=None, b_map=None, spec=None):
    from cxrdist.data.datasets import open_datasets
    from cxrdist.training.config import load_config

    b = {"location": str(datasets / "b" / "shards"), "name": "b", **({"label_map": b_map} if b_map is not None else {})}
    shards = spec if spec is not None else [{"location": str(datasets / "a" / "shards"), "name": "a"}, b]
    overrides = [f"data.shards={json.dumps(shards)}"] + ([f"data.vocabulary={json.dumps(vocabulary)}"] if vocabulary is not None else [])
    cfg = load_config(DEMO_CONFIG, overrides)  # as the trainer reads them: through the config
    return open_datasets(cfg.data.shards, cfg.data.vocabulary)


@pytest.mark.parametrize("b_map, needle", [
    ("Pleural Effusion", "the label_map of b maps its label names to harmonised names"),
    (["Pleural Effusion", "Edema"], "got ['Pleural Effusion', 'Edema']"),
    (5, "got 5"),
    ({"Pleural Effusion": 5}, "maps 'Pleural Effusion' to 5; a label is mapped to a name or null"),
    ({"Pleural Effusion": ["Effusion"]}, "a label is mapped to a name or null"),
    ({"Pleural Effusion": "pleural effusion"}, "'Pleural Effusion' (from a's 'Pleural Effusion') and 'pleural effusion' (from b's"),
    ({"Edema": "Pleural_Effusion", "Pleural Effusion": None}, "differ only in case, spaces or underscores"),
])
def test_label_maps_of_the_wrong_type_or_a_second_spelling_are_one_line(two_small_datasets, b_map, needle):
    with pytest.raises(UserError) as refused:
        open_two(two_small_datasets, b_map=b_map)
    assert needle in str(refused.value) and "\n" not in str(refused.value), refused.value


@pytest.mark.parametrize("vocabulary, needle", [
    ("Cardiomegaly", "expected a list of label names, e.g. [Cardiomegaly, Edema], got 'Cardiomegaly'"),
    (5, "got 5"),
    ({"Cardiomegaly": 1}, "got {'Cardiomegaly': 1}"),
    ([1, 2], "1 is not a label name"),
    ([], "an empty list names no label"),
    (["Cardiomegaly", "cardiomegaly"], "'Cardiomegaly' and 'cardiomegaly' differ only in case"),
])
def test_vocabularies_of_the_wrong_type_or_with_two_spellings_are_one_line(two_small_datasets, vocabulary, needle):
    with pytest.raises(UserError) as refused:
        open_two(two_small_datasets, vocabulary=vocabulary)
    assert needle in str(refused.value), refused.value


def test_a_vocabulary_with_one_location_is_refused_not_ignored(two_small_datasets):
    with pytest.raises(UserError, match="data.vocabulary applies to a list of datasets"):
        open_two(two_small_datasets, vocabulary=["Cardiomegaly"], spec=str(two_small_datasets / "a" / "shards"))


@pytest.mark.parametrize("spec, needle", [
    ({"location": "x"}, "one location or a list of datasets, got one mapping"),
    ([None, "x"], "a dataset's location is a directory or URL, got None"),
    ([{"location": ["x"]}, "y"], "got ['x']"),
    ([{"location": "x", "name": ["a"]}, "y"], "the name of x is text, got ['a']"),
])
def test_data_shards_of_the_wrong_shape_are_one_line(two_small_datasets, spec, needle):
    with pytest.raises(UserError) as refused:
        open_two(two_small_datasets, spec=spec)
    assert needle in str(refused.value), refused.value


def test_prepare_refuses_two_spellings_of_one_label(tmp_path, capsys):
    csv = make_images(tmp_path)
    table = pd.read_csv(csv)
    table["a "] = table["A"]
    table.to_csv(csv, index=False)
    assert main(["prepare", "--csv", str(csv), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--labels", "A,a ,B"]) == 2
    one_error(capsys, "labels 'A' and 'a' differ only in case")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- degenerate splits: refused where they are made


def test_a_test_split_of_one_image_is_refused_by_prepare(data, capsys):
    root, csv, images = data
    table = pd.read_csv(csv)
    table[table["path"] != "p00/img1.png"].to_csv(csv, index=False)  # patient p00 has one image left
    (root / "test.txt").write_text("p00/img0.png\n")
    assert main(prepare_args(csv, images, root / "out", "--test-list", str(root / "test.txt"))) == 2
    *progress_lines, error = capsys.readouterr().err.strip().splitlines()  # the images are read (and said) before the folds
    assert all(line.startswith("reading images: ") for line in progress_lines), progress_lines
    assert error.startswith("cxrdist prepare: error: the test split has 1 image(s) and no label with both a positive and a negative"), error
    assert not (root / "out").exists()


def test_a_split_is_scorable_when_one_label_has_both_classes_under_the_strictest_rule():
    from cxrdist.data.ingest.folds import check_scorable_splits

    nan = float("nan")
    raw = np.array([[1, 0], [nan, -1], [1, 1], [-1, 1]], dtype=float)  # rows: fold-0, fold-0, fold-1, fold-1
    check_scorable_splits(np.array(["fold-0", "fold-0"]), raw[:2])  # A: 1 and blank (a negative)
    with pytest.raises(UserError, match="the fold-1 split has 2 image"):  # A: 1 and -1 (left out); B: 1 and 1
        check_scorable_splits(np.array(["fold-0", "fold-0", "fold-1", "fold-1"]), raw)
