"""The CUDA path proven and measured against the bare model, in one command (see bench/README.md).

    python bench/gpu.py                 # on a CUDA machine: < 8 min on one GPU, all visible GPUs used by (b) and (d)
    python bench/gpu.py --smoke         # the same code on CPU, tiny model, a handful of steps (tests/test_gpu_bench.py)

Writes one JSON file (--out) and prints the ratios:
  shards  synthetic radiographs prepared on this machine's CPUs (JPEG, 512 px; 64 px in --smoke)
  (a) bare loop: timm backbone, bf16 autocast, channels_last, torch.compile, AdamW, random tensors on the device
  (b) the real trainer: `accelerate launch cxrdist/train.py --config configs/paper.yaml` (bf16, channels_last,
      compile, refinement, ASL, EMA) on the shards, all visible GPUs: steady img/s per GPU from metrics.jsonl,
      data-wait fraction, peak memory; ratio b/a (goal >= 0.95, data wait < 5%)
  (c) the train stream alone, cpu and device augmentation: img/s with the trainer's worker count
  (d) DeepSpeed ZeRO-2 bf16 for a few dozen steps: finite loss, checkpoint written, resumed
  (e) evaluation throughput (bf16) of (b)'s model; (b)'s gathered AUC == sklearn on its val_predictions.csv
  checks: refinement and loss ran in fp32 under autocast, EMA moved, no NaN, graph breaks inside the step,
      no host sync inside the step (`torch.cuda.set_sync_debug_mode("error")`)
Every check that cannot run on CPU is listed under "not_run_on_cpu". Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cxrdist.layout import BEST_DIR, METRICS_LOG, VAL_PREDICTIONS_FILE  # noqa: E402 (standard library only; the rest is imported where used)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROFILES = {
    # The paper's recipe at the paper's scale of image; pretrained weights off (no download on the GPU machine).
    "gpu": dict(backbone="seresnext101_32x4d", img_size=380, stored=512, batch=32, images=1600, folds=4, steps=160, steady_from=60,
                bare_steps=60, ds_steps=30, stream_batches=40, precision="bf16", compile=True, backend="inductor", log_every=5,
                warmup_batches=3, eval_warmup=True),
    # Every part's code once, as small as it goes: 36 training images = 4 steps = one epoch (one evaluation, one export),
    # 32 px, one warm-up batch where the GPU needs three for compile, no separate eval warm-up pass. torch.compile
    # with aot_eager: dynamo and AOT autograd trace forward and backward (graph breaks counted) without inductor's
    # code generation, which takes minutes on a CPU.
    "smoke": dict(backbone="test_resnet", img_size=32, stored=48, batch=8, images=48, folds=4, steps=4, steady_from=1,
                  bare_steps=2, ds_steps=4, stream_batches=2, precision="bf16", compile=True, backend="aot_eager", log_every=2,
                  warmup_batches=1, eval_warmup=False),
}
NOT_RUN_ON_CPU = ["torch.compile with inductor (aot_eager on CPU)", "channels_last", "torch.cuda.set_sync_debug_mode inside the step",
                  "peak GPU memory", "pinned-memory transfers", "DeepSpeed ZeRO-2 bf16 (run by tests/test_train.py on 2 CPU processes)",
                  "NCCL", "throughput figures (a tiny model on a shared CPU)"]


def say(text: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------- shards


def make_shards(work: Path, p: dict) -> Path:
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    workers = max(1, min(16, os.cpu_count() or 1))
    csv = make_synthetic_dataset(work / "raw", n=p["images"], size=p["stored"], seed=0, workers=workers, progress=False)
    prepare(PrepareOptions(source="csv", csv=csv, images=work / "raw" / "images", out=work / "shards", folds=p["folds"], max_size=p["stored"],
                           fmt="jpg", samples_per_shard=max(20, p["images"] // (4 * p["folds"])), workers=workers, progress=False))
    return work / "shards"


# ---------------------------------------------------------------- (a) bare loop


def bare_loop(p: dict, device: torch.device, labels: int) -> dict:
    import timm

    cuda = device.type == "cuda"
    model = timm.create_model(p["backbone"], pretrained=False, num_classes=labels).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model, backend=p["backend"]) if p["compile"] else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(p["batch"], 3, p["img_size"], p["img_size"], device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(p["batch"], labels, device=device) > 0.8).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = step_model(images)
        loss = loss_fn(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    warmup = 15 if cuda and p["compile"] else 2
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(p["bare_steps"]):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"img_per_s": p["batch"] * p["bare_steps"] / seconds, "steps": p["bare_steps"], "batch": p["batch"],
            "finite_loss": bool(torch.isfinite(loss))}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- (b), (d): the real trainer in real processes


def train_overrides(shards: Path, out: Path, p: dict, experiment: str, steps: int, extra: dict | None = None) -> list[str]:
    from cxrdist.data.datasets import load_manifest

    manifest = load_manifest(shards)
    world = gpu_count()
    steps_per_epoch = max(1, manifest.num_samples(manifest.train_splits(0)) // (max(1, world) * p["batch"]))
    epochs = max(1, -(-steps // steps_per_epoch))
    values = {
        "data.shards": shards, "output_dir": out, "experiment": experiment, "data.img_size": p["img_size"], "data.batch_size": p["batch"],
        "train.global_batch": p["batch"] * max(1, world),  # no accumulation: the steps above are sized for it
        "model.backbone": p["backbone"], "model.pretrained": "false", "train.epochs": epochs, "train.warmup_steps": 10,
        "train.eval_every": 10**9, "train.checkpoint_every": 10**9, "train.log_every": p["log_every"], "train.compile": str(p["compile"]).lower(),
        "train.compile_backend": p["backend"], "train.compile_devices": "all",
        "logging.progress": "false", "logging.wandb": "disabled",
    }
    if world == 0:
        values["data.workers"] = 1
    values.update(extra or {})
    return [f"{k}={v}" for k, v in values.items()] + ["--fold", "0"]


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch(args: list[str], config_file: str | None, log: Path, timeout: int) -> subprocess.CompletedProcess:
    world = gpu_count()
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(REPO / config_file)]
    cmd += ["--num_processes", str(max(1, world)), "--num_machines", "1", "--main_process_port", str(free_port())]
    if world > 1 and not config_file:
        cmd += ["--multi_gpu"]
    cmd += ["--mixed_precision", "bf16", "--dynamo_backend", "no", str(REPO / "cxrdist" / "train.py"),
            "--config", str(REPO / "configs" / "paper.yaml"), *args]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1",
           "CXRDIST_EXPECT_WORLD_SIZE": str(max(1, world))}
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently drop DeepSpeed
    if world == 0 and not config_file:
        env["ACCELERATE_USE_CPU"] = "1"
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode} (log: {log}): {result.stderr[-2000:]}")
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / METRICS_LOG).read_text().splitlines()) if r["kind"] == kind]


def real_trainer(shards: Path, work: Path, p: dict) -> dict:
    out = work / "runs"
    launch(train_overrides(shards, out, p, "bench", p["steps"]), None, work / "trainer.log", timeout=420)
    run_dir = out / "bench" / "fold-0"
    train = records(run_dir, "train")
    steady = [r for r in train if r["step"] > p["steady_from"]] or train[-1:]
    world = train[-1]["world_size"]
    img_s = float(np.median([r["img_per_s"] for r in steady])) / world
    memory = [r.get("max_memory_gib") for r in train if r.get("max_memory_gib") is not None]
    return {
        "run_dir": str(run_dir), "world_size": world, "steps": train[-1]["step"], "steady_records": len(steady),
        "img_per_s_per_gpu": img_s, "data_wait_fraction": float(np.median([r["data_wait_fraction"] for r in steady])),
        "peak_memory_gib": max(memory) if memory else None, "final_loss": train[-1]["loss"], "graph_breaks": train[-1].get("graph_breaks"),
        "all_losses_finite": all(np.isfinite(r["loss"]) for r in train), "bad_steps_total": train[-1]["bad_steps_total"],
    }


def deepspeed_zero2(shards: Path, work: Path, p: dict) -> dict:
    out = work / "runs"
    # One epoch (checkpoint at its end), then the same run asked for two: it resumes and trains the second.
    common = {"train.compile": "false", "train.checkpoint_every": 0}
    launch(train_overrides(shards, out, p, "zero2", 1, {**common, "train.epochs": 1}), "launch/deepspeed_zero2.yaml", work / "zero2-a.log",
           timeout=300)
    run_dir = out / "zero2" / "fold-0"
    checkpoints = sorted(c.name for c in (run_dir / "checkpoints").glob("step-*"))
    second = train_overrides(shards, out, p, "zero2", 1, {**common, "train.epochs": 2})
    result = launch(second, "launch/deepspeed_zero2.yaml", work / "zero2-b.log", timeout=300)
    train = records(run_dir, "train")
    return {
        "checkpoints_after_first_run": checkpoints, "resumed": "resumed from" in result.stdout + result.stderr,
        "steps": train[-1]["step"], "all_losses_finite": all(np.isfinite(r["loss"]) for r in train), "final_loss": train[-1]["loss"],
    }


# ---------------------------------------------------------------- (c) the stream alone


def stream_alone(shards: Path, p: dict, device: torch.device) -> dict:
    from cxrdist.data.device_augment import augment_batch
    from cxrdist.data.datasets import load_manifest
    from cxrdist.data.spec import ImageSpec
    from cxrdist.data.stream import StreamConfig, resolve_workers, train_loader
    from cxrdist.data.transforms import normalisation

    manifest = load_manifest(shards)
    workers = resolve_workers(-1) if device.type == "cuda" else 1
    results = {"workers": workers}
    for place in ("cpu", "device"):
        cfg = StreamConfig(ImageSpec(p["img_size"]), batch_size=p["batch"], workers=workers, augment=place)
        scale_shift = tuple(t.to(device) for t in normalisation(cfg.image))
        batches = iter(train_loader(shards, manifest, manifest.train_splits(0), cfg, 0, 1))
        next(batches)  # worker start-up
        start, images = time.perf_counter(), 0
        for _ in range(p["stream_batches"]):
            batch = next(batches)
            image = batch["image"].to(device, non_blocking=True)
            if place == "device":
                image = augment_batch(image, batch["augment"], cfg.image, scale_shift)
            images += len(batch["key"])
        synchronize(device)
        results[f"{place}_augment_img_per_s"] = images / (time.perf_counter() - start)
        del batches
    return results


# ---------------------------------------------------------------- (e) evaluation


def evaluation(run_dir: Path, shards: Path, p: dict, device: torch.device) -> dict:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from cxrdist.data.datasets import load_manifest
    from cxrdist.data.stream import eval_loader, resolve_workers
    from cxrdist.evaluation.scoring.gathered import predict
    from cxrdist.evaluation.prediction.models import stream_config
    from cxrdist.model.export import load_model

    model, card = load_model(run_dir / BEST_DIR, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    manifest = load_manifest(shards)
    batch = 4 * p["batch"]
    cfg = stream_config(card, batch, resolve_workers(-1) if device.type == "cuda" else 1)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def to_input(images, _model):
        images = images.to(device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images

    splits = [split for split in manifest.splits if split != "fold-0"] or ["fold-0"]
    with torch.inference_mode():
        if p["eval_warmup"]:  # cudnn autotuning and lazy CUDA state outside the timing
            predict({"m": model}, eval_loader(shards, manifest, splits[:1], cfg, 0, 1), device, autocast, to_input, pad_to=batch)
            synchronize(device)
        start = time.perf_counter()
        preds = predict({"m": model}, eval_loader(shards, manifest, splits, cfg, 0, 1), device, autocast, to_input, pad_to=batch)
        synchronize(device)
    seconds = time.perf_counter() - start
    # The trainer's gathered macro AUC against sklearn on the predictions it wrote.
    table = pd.read_csv(run_dir / BEST_DIR / VAL_PREDICTIONS_FILE)
    aucs = []
    for label in manifest.labels:
        known = table[f"target_{label}"].notna()
        if table.loc[known, f"target_{label}"].nunique() == 2:
            aucs.append(roc_auc_score(table.loc[known, f"target_{label}"], table.loc[known, f"prob_{label}"]))
    gathered = card.metrics["ema"]["macro_auc"]
    return {"img_per_s": len(preds.keys) / seconds, "images": len(preds.keys), "batch": batch, "gathered_macro_auc": gathered,
            "sklearn_macro_auc": float(np.mean(aucs)), "auc_abs_diff": abs(float(np.mean(aucs)) - gathered)}


# ---------------------------------------------------------------- checks inside the step (in this process)


def step_checks(shards: Path, work: Path, p: dict, device: torch.device) -> dict:
    from cxrdist.training.config import load_config
    from cxrdist.training.loop import Trainer, Window, graph_break_count

    cuda = device.type == "cuda"
    # The device-side augmentation is part of the step here, so the sync check covers it too.
    overrides = train_overrides(shards, work / "runs", p, "checks", 10, {"data.augment": "device"})[:-2]
    cfg = load_config(REPO / "configs" / "paper.yaml", overrides + [f"train.mixed_precision={p['precision']}"])
    trainer = Trainer(cfg)
    graph_breaks_before = graph_break_count()
    seen: dict[str, list] = {"refine_out": [], "loss_in": []}
    trainer.net.refine.register_forward_hook(lambda _m, _i, out: seen["refine_out"].append((out.dtype, torch.is_autocast_enabled(device.type))))
    masked_sum = trainer.loss_fn.masked_sum  # what the training step calls (the global masked mean scales it)

    def recording_loss(logits, *args, **kwargs):
        loss = masked_sum(logits, *args, **kwargs)
        seen["loss_in"].append(loss.dtype)
        return loss

    trainer.loss_fn.masked_sum = recording_loss
    batches = iter(trainer_loader(trainer))
    window = Window()
    for _ in range(p["warmup_batches"]):  # compile and lazy state outside the measured steps
        trainer.train_batch(trainer.next_micro_batch(batches), window)
    ema_before = {k: v.detach().clone() for k, v in trainer.ema.module.state_dict().items() if v.is_floating_point()}
    sync_mode = contextlib.nullcontext()
    if cuda:
        torch.cuda.synchronize(device)
        sync_mode = sync_debug_error()
    with sync_mode:  # the whole step as the loop runs it: the group's global-mean count, then the micro-batch
        trainer.train_batch(trainer.next_micro_batch(batches), window)
    synchronize(device)
    trainer.settle_bad_steps()
    ema_after = trainer.ema.module.state_dict()
    return {
        "refinement_fp32_under_autocast": all(dtype == torch.float32 for dtype, _ in seen["refine_out"]) and any(a for _, a in seen["refine_out"]),
        "loss_fp32": bool(seen["loss_in"]) and all(dtype == torch.float32 for dtype in seen["loss_in"]),
        "ema_moved": any(not torch.equal(ema_before[k], ema_after[k]) for k in ema_before),
        "grad_norm_finite": bool(torch.isfinite(window.grad_norm)), "bad_steps": trainer.state.bad_steps_total,
        # Breaks dynamo recorded while compiling and running the trainer's model (the bare loop's excluded).
        "graph_breaks_in_step": graph_break_count() - graph_breaks_before if p["compile"] else None, "compiled": trainer.compiled,
        "augment": cfg.data.augment,
        "no_sync_in_step": True if cuda else None,  # set_sync_debug_mode("error") raises on a sync
    }


def trainer_loader(trainer):
    from cxrdist.data.stream import train_loader

    acc = trainer.accelerator
    return train_loader(trainer.root, trainer.manifest, trainer.train_splits, trainer.stream, acc.process_index, acc.num_processes)


@contextlib.contextmanager
def sync_debug_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- main


def write_results(results: dict) -> None:
    """The JSON so far, after every part: a run stopped at a time limit still leaves what it measured."""
    out = Path(results["out"])
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(out)


def run_part(results: dict, name: str, fn, *args):
    say(f"{name} ...")
    start = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as err:  # noqa: BLE001 - the report records every part's failure, then fails at the end
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    write_results(results)
    say(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'}, default=str)}")
    return results[name]


def verdicts(results: dict, smoke: bool) -> dict:
    a, b, d, e, c = (results.get(k, {}) for k in ("a_bare", "b_trainer", "d_zero2", "e_eval", "checks"))
    checks = {
        "trainer_ran": "img_per_s_per_gpu" in b, "trainer_losses_finite": b.get("all_losses_finite") is True,
        "zero2_finite_and_resumed": d.get("all_losses_finite") is True and d.get("resumed") is True and bool(d.get("checkpoints_after_first_run")),
        "auc_equals_sklearn": e.get("auc_abs_diff", 1.0) <= 1e-9,
        "refinement_fp32_under_autocast": c.get("refinement_fp32_under_autocast") is True, "loss_fp32": c.get("loss_fp32") is True,
        "ema_moved": c.get("ema_moved") is True, "no_nan": c.get("grad_norm_finite") is True and a.get("finite_loss") is True,
    }
    checks["no_graph_break_in_step"] = c.get("compiled") is True and c.get("graph_breaks_in_step") == 0
    checks["no_graph_break_in_trainer"] = b.get("graph_breaks") == 0
    if not smoke:
        checks["no_sync_in_step"] = c.get("no_sync_in_step") is True
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a handful of steps: checks that the benchmark runs")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: bench/gpu-results.json, or gpu-smoke.json)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for shards and runs (default: a temporary one)")
    args = parser.parse_args()
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if not smoke and device.type != "cuda":
        print("bench/gpu.py: no CUDA device visible; run it on a GPU machine, or use --smoke on CPU", file=sys.stderr)
        return 2
    if smoke:
        torch.set_num_threads(1)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the launched trainers too
    p = PROFILES["smoke" if smoke else "gpu"]
    out = args.out or REPO / "bench" / ("gpu-smoke.json" if smoke else "gpu-results.json")
    work = args.work or Path(tempfile.mkdtemp(prefix="cxrdist-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {
        "mode": "smoke (CPU)" if smoke else "gpu", "profile": p, "work": str(work), "out": str(out), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "gpus": gpu_count(), "cpus": os.cpu_count(),
        "not_run_on_cpu": NOT_RUN_ON_CPU if smoke else [],
    }
    say(f"{results['mode']} on {results['device']} x {max(1, results['gpus'])}; work in {work}")
    shards = run_part(results, "shards", lambda: {"path": str(make_shards(work, p))})
    if "error" not in shards:
        labels = len(json.loads((Path(shards["path"]) / "manifest.json").read_text())["labels"])
        run_part(results, "a_bare", bare_loop, p, device, labels)
        run_part(results, "checks", step_checks, Path(shards["path"]), work, p, device)
        b = run_part(results, "b_trainer", real_trainer, Path(shards["path"]), work, p)
        run_part(results, "c_stream", stream_alone, Path(shards["path"]), p, device)
        if smoke:
            results["d_zero2"] = {
                "skipped": "DeepSpeed on CPU is covered by tests/test_train.py::test_deepspeed_zero2_trains_and_evaluates_on_two_cpu_processes"}
        else:
            run_part(results, "d_zero2", deepspeed_zero2, Path(shards["path"]), work, p)
        if "run_dir" in b:
            run_part(results, "e_eval", evaluation, Path(b["run_dir"]), Path(shards["path"]), p, device)
    a, b = results.get("a_bare", {}), results.get("b_trainer", {})
    if "img_per_s" in a and "img_per_s_per_gpu" in b:
        results["ratio_trainer_over_bare"] = b["img_per_s_per_gpu"] / a["img_per_s"]
    results["checks_passed"] = verdicts(results, smoke)
    if smoke:
        results["checks_passed"].pop("zero2_finite_and_resumed")
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_results(results)
    failed = [name for name, ok in results["checks_passed"].items() if not ok]
    say(f"ratio (b)/(a) = {results.get('ratio_trainer_over_bare', float('nan')):.3f} (goal >= 0.95); "
        f"data wait {b.get('data_wait_fraction', float('nan')):.3f} (goal < 0.05); {results['seconds']} s; results in {out}")
    if failed:
        say(f"FAILED checks: {', '.join(failed)}")
        return 1
    say("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
