"""Running the real trainer in real processes (accelerate launch, or the script alone)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "cxrdist" / "train.py"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def synthetic_shards(root: Path, n: int, folds: int, samples_per_shard: int) -> Path:
    """Synthetic radiographs (rendered at 96 px, stored as 64 px PNG) prepared into real shards + a 20% test split."""
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    csv = make_synthetic_dataset(root / "raw", n=n, size=96, seed=3, workers=2, progress=False)
    prepare(PrepareOptions(source="csv", csv=csv, images=root / "raw" / "images", out=root / "shards", folds=folds, test_fraction=0.2,
                           max_size=64, fmt="png", samples_per_shard=samples_per_shard, workers=2, progress=False))
    return root / "shards"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_overrides(shards: Path, out: Path, **extra) -> list[str]:
    """The demo config made small: a tiny backbone, 64 px, short epochs."""
    values = {
        "data.shards": shards, "output_dir": out, "data.img_size": 64, "data.batch_size": 16, "data.workers": 1,
        "data.shuffle_buffer": 100, "model.backbone": "test_resnet", "train.epochs": 2, "train.warmup_steps": 5,
        "train.log_every": 1, "train.eval_every": 0, "logging.progress": "false", "logging.wandb": "disabled",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def cpu_env(world_size: int, **extra) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CXRDIST_EXPECT_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch_cpu(args: list[str], processes: int = 2, timeout: int = 600, env: dict | None = None,
               machine: tuple | None = None) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` (plain --cpu silently starts one process)."""
    cmd = LAUNCH + ["--multi_gpu", "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if machine is None:
        cmd += ["--num_machines", "1", "--main_process_port", str(free_port())]
    else:
        rank, machines, port = machine
        cmd += ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    cmd += [str(TRAIN), "--config", str(DEMO_CONFIG), *args]
    return subprocess.run(cmd, env=env or cpu_env(processes), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def deepspeed_env(world_size: int = 2) -> dict:
    env = cpu_env(world_size)
    env.pop("ACCELERATE_USE_CPU")  # that variable silently drops DeepSpeed
    return env


def launch_deepspeed(args: list[str], launch_config: str = "deepspeed_zero2.yaml", precision: str = "no",
                     timeout: int = 900) -> subprocess.CompletedProcess:
    """2 CPU processes through one of launch/'s DeepSpeed configs (its JSON's "auto" fields filled by the trainer)."""
    cmd = LAUNCH + ["--config_file", str(REPO / "launch" / launch_config), "--num_processes", "2", "--mixed_precision", precision,
                    "--main_process_port", str(free_port()), str(TRAIN), "--config", str(DEMO_CONFIG), *args]
    return subprocess.run(cmd, env=deepspeed_env(2), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_single(args: list[str], timeout: int = 600, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), *args]
    return subprocess.run(cmd, env=env or cpu_env(1), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def label_aucs(table, labels: list[str]) -> list[float]:
    """scikit-learn's AUC of every label of a prediction table (prob_/target_ columns, blank target = left out) with both classes."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for label in labels:
        known = table[f"target_{label}"].notna()
        y = table.loc[known, f"target_{label}"]
        if y.nunique() == 2:
            aucs.append(roc_auc_score(y, table.loc[known, f"prob_{label}"]))
    return aucs


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(l).get("step", 0) >= step for l in path.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def final_ema(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(str(newest / "ema.safetensors"))


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"


def single_process_auc(model_dir: Path, shards: Path, fold: int) -> dict:
    """The same checkpoint evaluated in this one process, no accelerate, no gather."""
    from cxrdist.data.datasets import load_manifest
    from cxrdist.data.stream import StreamConfig, eval_loader
    from cxrdist.evaluation.scoring.gathered import predict, score
    from cxrdist.labels.eval_targets import evaluation_policy
    from cxrdist.model.export import load_model

    model, card = load_model(model_dir)
    manifest = load_manifest(shards)
    batch = card.eval_batch_size
    cfg = StreamConfig(card.image, batch_size=batch, workers=0)
    preds = predict({"m": model}, eval_loader(shards, manifest, [f"fold-{fold}"], cfg, 0, 1), "cpu", pad_to=batch).sorted()
    assert len(preds.keys) == len(set(preds.keys)) == manifest.num_samples([f"fold-{fold}"])
    return score(preds, manifest.labels, evaluation_policy(card.evaluation.targets, len(manifest.labels)))["m"]
