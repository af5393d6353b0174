"""slurm/train_folds.sh on a real two-node SLURM cluster (tests/slurm_two_nodes.py): every fold task
runs one `accelerate launch` per node, each node in its own network namespace (world size 2), the
ensemble job runs after the array, and a fold preempted with USR1 requeues and resumes on two nodes.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import ClusterUnavailable
from slurm_two_nodes import NODE_NAMES, TwoNodeCluster, start_two_node_cluster
from trainer_utils import fast_overrides, synthetic_shards
from two_hosts import TwoHosts, two_hosts_or_skip

REPO = Path(__file__).resolve().parents[1]
TRAIN_FOLDS = REPO / "slurm" / "train_folds.sh"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
WAIT = 900  # seconds; a guard against hangs, not a speed requirement
# 6 steps per epoch (2 ranks x 8) x 3 epochs: long enough to preempt in the middle.
# data.workers=0: once in three full-suite runs, rank 1's eval DataLoader worker (forked anew at every evaluation)
# produced nothing after a resume and rank 0 timed out at the gather; under investigation (see the issue note).
# This test is about SLURM across two nodes, so it reads in the trainer processes; tests/test_multinode.py keeps a worker.
TRAINING = {"data.batch_size": 8, "train.epochs": 3, "train.dist_timeout": 60, "data.workers": 0}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def hosts() -> TwoHosts:
    yield from two_hosts_or_skip(tag=f"{os.getpid()}s")


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory) -> TwoNodeCluster:
    try:
        running = start_two_node_cluster(tmp_path_factory.mktemp("slurm2"), hosts)
    except ClusterUnavailable as err:
        pytest.skip(f"no two-node SLURM cluster: {err}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def run(cluster, hosts, tmp_path_factory) -> dict:
    """`NODES=2 GPUS_PER_NODE=0 PROCS_PER_NODE=1 sbatch slurm/train_folds.sh ...`; fold 0 gets USR1 mid-run."""
    work = tmp_path_factory.mktemp("slurm2-demo")
    shards = synthetic_shards(work / "data", n=240, folds=2, samples_per_shard=50)
    runs = work / "runs"
    env = {"NODES": "2", "GPUS_PER_NODE": "0", "PROCS_PER_NODE": "1", "PYTHON": sys.executable, "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": hosts.addresses[0]}  # the node names are not in DNS here (README: slurm/README.md)
    done = cluster.run("sbatch", "--parsable", f"--output={work}/submit-%j.out", str(TRAIN_FOLDS), str(DEMO_CONFIG),
                       *map(str, fast_overrides(shards, runs, **TRAINING)), env=env, cwd=work)
    submitter = done.stdout.strip().split(";")[0]
    [record] = cluster.wait_finished(submitter, timeout=WAIT)
    text = (work / f"submit-{submitter}.out").read_text()
    assert record["JobState"] == "COMPLETED", text
    ids = {"array": re.search(r"fold array job: (\d+)", text).group(1), "ensemble": re.search(r"ensemble job: (\d+)", text).group(1)}

    exp = runs / "demo"
    metrics = exp / "fold-0" / "metrics.jsonl"
    deadline = time.monotonic() + WAIT
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        assert time.monotonic() < deadline, "fold 0 never logged a training step"
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", f"{ids['array']}_0")

    folds = cluster.wait_finished(ids["array"], timeout=WAIT)
    [ensemble] = cluster.wait_finished(ids["ensemble"], timeout=WAIT)
    logs = {k: (exp / "slurm" / f"fold-{k}-{ids['array']}_{k}.out").read_text(errors="replace") for k in (0, 1)}
    return {"exp": exp, "ids": ids, "folds": {int(r["ArrayTaskId"]): r for r in folds}, "ensemble": ensemble, "logs": logs}


def test_every_fold_runs_one_launcher_per_node_with_world_size_two(run, hosts):
    for fold, record in run["folds"].items():
        log = run["logs"][fold]
        assert record["JobState"] == "COMPLETED", log[-4000:]
        assert record["NodeList"] == f"cxn[0-{len(NODE_NAMES) - 1}]" and record["NumNodes"] == "2"
        assert f"fold {fold} finished" in log
        assert "on 2 process(es)" in log  # rank 0 counted a world of 2 ranks
        # One line per node and start: each launcher picked its own veth, the only way to its peer.
        starts = 1 + int(record["Restarts"])
        assert log.count(f"process-group network interface {hosts.ifname} (routes to MASTER_ADDR {hosts.addresses[0]}") == 2 * starts, log[-4000:]
        assert (run["exp"] / f"fold-{fold}" / "best" / "model.safetensors").is_file()


def test_the_ensemble_job_runs_after_the_array(run):
    from cxrdist.evaluation.prediction.ensemble import METRICS_FILE

    ensemble = run["ensemble"]
    assert ensemble["JobState"] == "COMPLETED"
    assert ensemble["StartTime"] >= max(r["EndTime"] for r in run["folds"].values())
    assert (run["exp"] / "ensemble" / METRICS_FILE).is_file()


def test_a_preempted_fold_requeues_and_resumes_on_two_nodes(run):
    record, log = run["folds"][0], run["logs"][0]
    assert record["Restarts"] == "1", log[-4000:]
    preempted = re.search(r"preempted \(SIGUSR1\): checkpoint at step (\d+) written, exiting with 75", log)
    assert preempted, log[-4000:]
    assert f"requeueing {run['ids']['array']}_0" in log
    resumed = re.search(r"resumed from .*step-0*(\d+) \(step (\d+)", log)
    assert resumed and resumed.group(2) == preempted.group(1), log[-4000:]
    after = log[resumed.start():]
    assert "on 2 process(es)" in after and "fold 0 finished" in after
