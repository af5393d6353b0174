"""slurm/train_folds.sh: its decisions against stand-in srun/sbatch/scontrol commands, then on a
real one-node SLURM cluster (started as root by the `cluster` fixture).

On the cluster, CPU processes stand in for GPUs (GPUS_PER_NODE=0, PROCS_PER_NODE=2): every fold
is a 2-rank DDP run over gloo, started through srun + accelerate launch as on a GPU cluster.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import ClusterUnavailable, SlurmCluster, start_cluster
from trainer_utils import fast_overrides, synthetic_shards


REPO = Path(__file__).resolve().parents[1]
TRAIN_FOLDS = REPO / "slurm" / "train_folds.sh"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
WAIT = 900  # seconds; a guard against hangs, not a speed requirement
# 5 steps per epoch x 3 epochs per fold: long enough to preempt in the middle of an epoch.
TRAINING = {"data.batch_size": 8, "train.epochs": 3}


# ---- without SLURM: the script's decisions, with srun/sbatch/scontrol replaced by recorders ----

STAND_INS = {
    "srun": """#!/bin/bash
printf '%s\\n' "$@" > "$RECORD/srun.args"
echo "${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-unset}" > "$RECORD/srun.store_sharing"
trap 'echo USR1 >> "$RECORD/srun.signals"' USR1
touch "$RECORD/srun.started"
for _ in $(seq 1 "${FAKE_SRUN_TICKS:-0}"); do sleep 0.1; done  # ticks of 0.1 s
exit "${FAKE_SRUN_RC:-0}"
""",
    "scontrol": """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then echo node001; echo node002; exit 0; fi
echo "$*" >> "$RECORD/scontrol.calls"
""",
    "sbatch": """#!/bin/bash
n=$(ls "$RECORD" | grep -c '^sbatch' || true)
printf '%s\\n' "$@" > "$RECORD/sbatch.$n.args"
echo $((100 + n))
""",
}


@pytest.fixture
def stand_ins(tmp_path) -> dict:
    """PATH with recording srun/sbatch/scontrol; returns the environment and the record directory."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", RECORD=str(record), CXRDIST_HOME=str(REPO), PYTHON=sys.executable)
    return {"env": env, "record": record}


def fold_task_env(stand_ins, **extra) -> dict:
    """What sbatch gives array task 1 of job 123 on two nodes (its own job id is 125)."""
    env = dict(stand_ins["env"], CXRDIST_SLURM_ROLE="fold", SLURM_JOB_ID="125", SLURM_ARRAY_JOB_ID="123",
               SLURM_ARRAY_TASK_ID="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[001-002]", SLURM_CPUS_PER_TASK="64")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_fold_task(env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG), "train.epochs=1"], env=env, capture_output=True, text=True, timeout=timeout)


def srun_call(record: Path) -> tuple[list[str], list[str]]:
    """(srun's own flags, the per-node `accelerate launch` arguments after the interpreter)."""
    args = (record / "srun.args").read_text().splitlines()
    command = args.index("bash")
    assert args[command + 1] == "-c" and 'trap "" USR1' in args[command + 2]
    return args[:command], args[command + 4:]


def test_fold_task_starts_one_launcher_per_node_with_the_job_geometry(stand_ins):
    done = run_fold_task(fold_task_env(stand_ins, GPUS_PER_NODE=8))
    assert done.returncode == 0, done.stdout + done.stderr
    srun, launch = srun_call(stand_ins["record"])
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64", "--gres=gpu:8"} <= set(srun)
    flags = " ".join(launch)
    assert "--num_machines 2 --main_process_ip node001 --main_process_port 20125" in flags  # 20000 + 125 % 20000
    assert "--rdzv_conf timeout=600" in flags  # a node that never starts: the others give up at the rendezvous
    assert "--num_processes 16 --mixed_precision bf16 --multi_gpu" in flags
    assert launch[launch.index("--config") - 1:] == [str(REPO / "cxrdist" / "train.py"), "--config", str(DEMO_CONFIG), "--fold", "1",
                                                     "train.epochs=1"]
    assert not (stand_ins["record"] / "scontrol.calls").exists()  # finished: no requeue


def test_fold_task_with_a_deepspeed_config_and_cpu_processes(stand_ins):
    done = run_fold_task(fold_task_env(stand_ins, GPUS_PER_NODE=8, LAUNCH_CONFIG="launch/deepspeed_zero2.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    _, launch = srun_call(stand_ins["record"])
    assert launch[:2] == ["--config_file", "launch/deepspeed_zero2.yaml"] and "--multi_gpu" not in launch

    done = run_fold_task(fold_task_env(stand_ins, GPUS_PER_NODE=0, PROCS_PER_NODE=3, RDZV_TIMEOUT=90))
    assert done.returncode == 0, done.stdout + done.stderr
    srun, launch = srun_call(stand_ins["record"])
    assert not any(a.startswith("--gres") for a in srun)
    assert "--num_processes 6 --mixed_precision no --multi_gpu" in " ".join(launch)
    assert "--rdzv_conf timeout=90" in " ".join(launch)


@pytest.mark.parametrize("code, requeued", [(75, True), (1, False), (0, False)])
def test_fold_task_requeues_itself_only_on_exit_code_75(stand_ins, code, requeued):
    done = run_fold_task(fold_task_env(stand_ins, GPUS_PER_NODE=8, FAKE_SRUN_RC=code))
    calls = stand_ins["record"] / "scontrol.calls"
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", "123_1"] if requeued else [])
    assert done.returncode == (0 if requeued else code), done.stdout + done.stderr


def start_fold_task(env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = Path(env["RECORD"]) / "srun.started"
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0] if proc.poll() is not None else "srun never started"
        time.sleep(0.05)
    return proc


def test_usr1_is_forwarded_to_the_step_and_a_preempted_step_is_requeued(stand_ins):
    """accelerate launch reports the trainers' 75 as 1: after a forwarded USR1, 1 means 'preempted'."""
    proc = start_fold_task(fold_task_env(stand_ins, GPUS_PER_NODE=8, FAKE_SRUN_RC=1, FAKE_SRUN_TICKS=15, RESIGNAL_EVERY=0.3))
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "USR1: preemption warning" in out
    signals = (stand_ins["record"] / "srun.signals").read_text().split()
    assert len(signals) >= 2  # forwarded at once, then repeated until the step ended
    assert (stand_ins["record"] / "scontrol.calls").read_text().split() == ["requeue", "123_1"]


def test_sigterm_from_slurm_ends_the_task_without_requeue(stand_ins):
    """scancel / time limit: SLURM terminates the job, and a cancelled job must stay cancelled."""
    proc = start_fold_task(fold_task_env(stand_ins, GPUS_PER_NODE=8, FAKE_SRUN_RC=75, FAKE_SRUN_TICKS=10))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    assert not (stand_ins["record"] / "scontrol.calls").exists()


def test_fold_task_gives_up_after_max_requeues(stand_ins):
    done = run_fold_task(fold_task_env(stand_ins, GPUS_PER_NODE=8, FAKE_SRUN_RC=75, SLURM_RESTART_COUNT=3, MAX_REQUEUES=3))
    assert done.returncode == 1 and "giving up" in done.stdout
    assert not (stand_ins["record"] / "scontrol.calls").exists()


def test_usage_and_missing_config_errors_are_one_line(stand_ins):
    done = subprocess.run(["bash", str(TRAIN_FOLDS)], env=stand_ins["env"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("train_folds.sh: error: usage:")
    done = subprocess.run(["bash", str(TRAIN_FOLDS), "configs/nope.yaml"], env=stand_ins["env"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr.strip() == "train_folds.sh: error: config configs/nope.yaml: no such file"
    env = dict(stand_ins["env"], RDZV_TIMEOUT="10m")
    done = subprocess.run(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "train_folds.sh: error: RDZV_TIMEOUT=10m: expected a number of seconds >= 1"
    assert not list(stand_ins["record"].glob("sbatch.*"))


def test_a_node_range_lets_a_task_start_on_fewer_nodes_and_max_restarts_reaches_the_launcher(stand_ins, tmp_path):
    env = dict(stand_ins["env"], NODES="1-2", GPUS_PER_NODE="8", FOLDS="0", ENSEMBLE="0", MAX_RESTARTS="2")
    done = subprocess.run(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG), "data.shards=/not/read"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    array = (stand_ins["record"] / "sbatch.0.args").read_text().splitlines()
    assert "--nodes=1-2" in array and not any(a.startswith("--ntasks=") for a in array)  # SLURM picks the count per start
    # the start SLURM gave one node: one launcher, 8 processes, restarts of failed trainers inside it
    done = run_fold_task(fold_task_env(stand_ins, GPUS_PER_NODE=8, SLURM_JOB_NUM_NODES=1, SLURM_JOB_NODELIST="node001", MAX_RESTARTS=2))
    assert done.returncode == 0, done.stdout + done.stderr
    srun, launch = srun_call(stand_ins["record"])
    assert {"--nodes=1", "--ntasks=1"} <= set(srun)
    assert "--num_machines 1" in " ".join(launch) and "--num_processes 8" in " ".join(launch)
    assert "--max_restarts 2 --rdzv_backend c10d" in " ".join(launch)  # a fresh rendezvous store per restart:
    assert (stand_ins["record"] / "srun.store_sharing").read_text().strip() == "1"  # c10d's store not shared with the trainers


@pytest.mark.parametrize("variables, words", [({"NODES": "2-1"}, "NODES=2-1: expected"), ({"NODES": "0"}, "NODES=0: expected"),
                                              ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS=-1: expected 0"),
                                              ({"MAX_RESTARTS": "101"}, "MAX_RESTARTS=101: expected 0")])
def test_a_bad_node_count_or_restart_limit_is_one_line_and_queues_nothing(stand_ins, tmp_path, variables, words):
    env = dict(stand_ins["env"], FOLDS="0", **variables)
    done = subprocess.run(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG), "data.shards=/not/read"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr
    assert not list(stand_ins["record"].glob("sbatch.*"))


@pytest.mark.slow
def test_submitter_sizes_the_array_from_the_manifest_and_chains_the_ensemble(stand_ins, synth_shards, tmp_path):
    env = dict(stand_ins["env"], NODES="2", GPUS_PER_NODE="8", PARTITION="gpu", ACCOUNT="lab", TIME="12:00:00",
               EXTRA_SBATCH_ARGS="--exclusive --qos=high")
    bad = subprocess.run(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG), f"data.shards={synth_shards}", "train.nope=1"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "train.nope" in bad.stderr, bad.stderr
    assert not list(stand_ins["record"].glob("sbatch.*"))  # nothing queued for a bad override

    done = subprocess.run(["bash", str(TRAIN_FOLDS), str(DEMO_CONFIG), f"data.shards={synth_shards}", "train.epochs=2"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fold array job: 100" in done.stdout and "ensemble job: 101" in done.stdout
    exp = tmp_path / "runs" / "demo"
    assert (exp / "slurm").is_dir()  # sbatch needs the --output directory to exist
    array = (stand_ins["record"] / "sbatch.0.args").read_text().splitlines()
    ensemble = (stand_ins["record"] / "sbatch.1.args").read_text().splitlines()
    assert {"--array=0-2", "--nodes=2", "--ntasks-per-node=1", "--gres=gpu:8", "--cpus-per-task=64", "--requeue",
            "--signal=B:USR1@300", "--time=12:00:00", "--partition=gpu", "--account=lab", "--exclusive", "--qos=high",
            f"--output={exp}/slurm/fold-%a-%A_%a.out", "--open-mode=append"} <= set(array)
    assert array[array.index(str(REPO / "slurm" / "train_folds.sh")):] == [str(REPO / "slurm" / "train_folds.sh"), str(DEMO_CONFIG),
                                                                           f"data.shards={synth_shards}", "train.epochs=2"]
    assert {"--dependency=afterok:100", "--kill-on-invalid-dep=yes", "--gres=gpu:1", "--partition=gpu"} <= set(ensemble)
    assert ensemble[-2:] == [str(REPO / "slurm" / "ensemble.sh"), str(exp)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    started = time.monotonic()
    try:
        running = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as err:
        pytest.skip(f"no SLURM cluster: {err}")
    print(f"\nSLURM cluster up in {time.monotonic() - started:.1f} s")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def two_fold_shards(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("slurm-data"), n=240, folds=2, samples_per_shard=50)


def job_env(**extra) -> dict:
    env = {"PYTHON": sys.executable, "GPUS_PER_NODE": "0", "PROCS_PER_NODE": "2", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:  # the script's rendezvous host is the node name; this one is not in DNS or /etc/hosts
        env["MASTER_ADDR"] = "127.0.0.1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def submit(cluster: SlurmCluster, workdir: Path, args: list, **env) -> dict[str, str]:
    """`sbatch slurm/train_folds.sh ARGS` as a user runs it; returns the job ids the submitter printed."""
    done = cluster.run("sbatch", "--parsable", f"--output={workdir}/submit-%j.out", str(TRAIN_FOLDS), *map(str, args),
                       env=job_env(**env), cwd=workdir)
    submitter = done.stdout.strip().split(";")[0]
    [record] = cluster.wait_finished(submitter, timeout=WAIT)
    text = (workdir / f"submit-{submitter}.out").read_text()
    assert record["JobState"] == "COMPLETED", text
    ids = {"array": re.search(r"fold array job: (\d+)", text).group(1)}
    ensemble = re.search(r"ensemble job: (\d+)", text)
    if ensemble:
        ids["ensemble"] = ensemble.group(1)
    return ids


def fold_log(exp: Path, array: str, fold: int) -> str:
    return (exp / "slurm" / f"fold-{fold}-{array}_{fold}.out").read_text(errors="replace")


def eval_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def last_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


@pytest.fixture(scope="module")
def two_folds(cluster, two_fold_shards, tmp_path_factory) -> dict:
    """Both folds of the demo experiment trained by one `sbatch slurm/train_folds.sh`, then ensembled."""
    work = tmp_path_factory.mktemp("slurm-demo")
    runs = work / "runs"
    ids = submit(cluster, work, [DEMO_CONFIG, *fast_overrides(two_fold_shards, runs, **TRAINING)])
    folds = cluster.wait_finished(ids["array"], timeout=WAIT)
    [ensemble] = cluster.wait_finished(ids["ensemble"], timeout=WAIT)
    return {"exp": runs / "demo", "ids": ids, "folds": folds, "ensemble": ensemble, "runs": runs}


@pytest.mark.slurm
@pytest.mark.slow
def test_every_fold_trains_then_the_ensemble_job_runs(two_folds):
    from cxrdist.evaluation.prediction.ensemble import METRICS_FILE
    from cxrdist.evaluation.report.report import PAGE_FILE

    exp, ids = two_folds["exp"], two_folds["ids"]
    logs = {k: fold_log(exp, ids["array"], k) for k in (0, 1)}
    assert sorted(int(r["ArrayTaskId"]) for r in two_folds["folds"]) == [0, 1]
    for record in two_folds["folds"]:
        fold = int(record["ArrayTaskId"])
        assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "0"), logs[fold][-3000:]
        assert f"fold {fold} finished" in logs[fold]
        assert "on 2 process(es)" in logs[fold]  # two real ranks, not two lone processes
        run_dir = exp / f"fold-{fold}"
        assert (run_dir / "best" / "model.safetensors").is_file()
        assert eval_records(run_dir)[-1]["epoch"] == TRAINING["train.epochs"]

    ensemble = two_folds["ensemble"]
    ensemble_log = next((exp / "slurm").glob(f"ensemble-{ids['ensemble']}.out")).read_text(errors="replace")
    assert ensemble["JobState"] == "COMPLETED", ensemble_log[-3000:]
    assert ensemble["StartTime"] >= max(r["EndTime"] for r in two_folds["folds"])  # afterok on the whole array
    metrics = json.loads((exp / "ensemble" / METRICS_FILE).read_text())
    assert metrics  # the evaluation's own tests check its content
    assert list(exp.rglob(PAGE_FILE)), f"no {PAGE_FILE} under {exp}"


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_fold_requeues_resumes_and_ends_like_an_uninterrupted_run(cluster, two_folds, two_fold_shards, tmp_path):
    """USR1 to the batch shell, as --signal=B:USR1@N sends it ahead of the time limit."""
    exp = two_folds["runs"] / "demo-preempt"
    overrides = fast_overrides(two_fold_shards, two_folds["runs"], experiment="demo-preempt", **TRAINING)
    ids = submit(cluster, tmp_path, [DEMO_CONFIG, *overrides], FOLDS="0", ENSEMBLE="0")
    task = f"{ids['array']}_0"
    metrics = exp / "fold-0" / "metrics.jsonl"
    deadline = time.monotonic() + WAIT
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        assert time.monotonic() < deadline, "fold 0 never logged a training step"
        assert cluster.job(task).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", task)

    [record] = cluster.wait_finished(ids["array"], timeout=WAIT)
    log = fold_log(exp, ids["array"], 0)
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1"), log[-4000:]
    preempted = re.search(r"preempted \(SIGUSR1\): checkpoint at step (\d+) written, exiting with 75", log)
    assert preempted, log[-4000:]
    assert "exitcode  : 75" in log  # what the trainers returned, before accelerate launch made it 1
    assert f"requeueing {task}" in log
    resumed = re.search(r"resumed from .*step-0*(\d+) \(step (\d+)", log)
    assert resumed and resumed.group(2) == preempted.group(1), log[-4000:]

    # Same final metrics and weights as fold 0 of the uninterrupted experiment.
    from safetensors.torch import load_file

    reference = two_folds["exp"] / "fold-0"
    final, expected = eval_records(exp / "fold-0")[-1], eval_records(reference)[-1]
    assert 0 < int(preempted.group(1)) < expected["step"]  # it stopped in the middle of the run
    assert final["step"] == expected["step"]
    assert final["ema"]["macro_auc"] == expected["ema"]["macro_auc"]
    assert final["live"]["macro_auc"] == expected["live"]["macro_auc"]
    ours, theirs = last_checkpoint(exp / "fold-0"), last_checkpoint(reference)
    assert ours.name == theirs.name
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ours / name), load_file(theirs / name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name


@pytest.mark.slurm
@pytest.mark.slow
def test_lodo_submission_trains_every_held_out_run_then_one_job_summarises(cluster, tmp_path):
    """`bash slurm/lodo.sh`: a fold array per left-out dataset, then `cxrdist lodo --evaluate-only` after all of them."""
    from test_datasets import NIH_STYLE, prepare_synthetic

    shards = {"a": prepare_synthetic(tmp_path / "a", seed=3, n=80, folds=2),
              "b": prepare_synthetic(tmp_path / "b", seed=5, n=80, folds=2, rename=NIH_STYLE)}
    runs = tmp_path / "runs"
    spec = json.dumps([{"location": str(path), "name": name} for name, path in shards.items()])
    overrides = fast_overrides(spec, runs, experiment="lodo", **{"train.epochs": 1})
    done = cluster.run("bash", str(REPO / "slurm" / "lodo.sh"), str(DEMO_CONFIG), *overrides, cwd=tmp_path,
                       env=job_env(PROCS_PER_NODE=1, LODO_ARGS="--resamples 20 --workers 0"))
    found = re.search(r"lodo summary job: (\d+) \(after fold arrays ([\d ]+)\)", done.stdout)
    assert found, done.stdout + done.stderr
    arrays = found.group(2).split()
    assert len(arrays) == 2
    folds = [record for array in arrays for record in cluster.wait_finished(array, timeout=WAIT)]
    [summary_job] = cluster.wait_finished(found.group(1), timeout=WAIT)
    log = (runs / "lodo" / "lodo" / f"summary-{found.group(1)}.out").read_text(errors="replace")
    assert summary_job["JobState"] == "COMPLETED", log[-4000:]
    assert [r["JobState"] for r in folds] == ["COMPLETED"] * 4
    assert summary_job["StartTime"] >= max(r["EndTime"] for r in folds)  # afterok on every array
    assert log.count("not relaunched") == 4 and "training lodo" not in log  # the arrays trained; this job only evaluates

    summary = json.loads((runs / "lodo" / "lodo" / "lodo.json").read_text())
    assert list(summary["held_out"]) == ["a", "b"]
    for name, other in (("a", "b"), ("b", "a")):
        row = summary["held_out"][name]
        experiment = runs / f"lodo-without-{name}"
        assert row["trained_on"] == [other] and 0 <= row["external"]["macro_auc"] <= 1
        assert json.loads(Path(row["external"]["metrics"]).read_text())["num_samples"] == 80
        assert Path(row["external"]["metrics"]).parent.parent == experiment / "external"
        card = json.loads((experiment / "fold-0" / "best" / "model.json").read_text())
        assert card["dataset"]["datasets"] == [other]
