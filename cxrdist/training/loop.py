"""The training loop: data-parallel steps with EMA and the refinement's proximal step, gathered
evaluation of the live and EMA models, atomic checkpoints, agreed preemption."""

from __future__ import annotations

import math
import os
import time
from collections import deque
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file
from timm.scheduler import CosineLRScheduler

from cxrdist import distributed
from cxrdist.data.location import display
from cxrdist.atomic import atomic_write_text
from cxrdist.data.device_augment import augment_batch
from cxrdist.data.datasets import open_datasets
from cxrdist.evaluation.scoring.by_dataset import summary_line
from cxrdist.data.stream import StreamConfig, eval_loader, resolve_workers, steps_per_epoch, train_loader, train_shards
from cxrdist.data.transforms import normalisation
from cxrdist.errors import UserError
from cxrdist.log import get_logger, progress
from cxrdist.layout import BEST_DIR, CONFIG_FILE, METRICS_LOG, VAL_PREDICTIONS_FILE, WEIGHTS_FILE, fold_name
from cxrdist.evaluation.scoring.gathered import check_complete, gather_predictions, predict, score, write_predictions_csv
from cxrdist.evaluation.scoring.subgroups import wandb_values
from cxrdist.labels.eval_targets import evaluation_policy
from cxrdist.model.ema import ModelEma
from cxrdist.model.card import CardEvaluation, ModelCard
from cxrdist.model.export import save_model
from cxrdist.model.inert import KNOB, inert_message, max_logit_shift
from cxrdist.model.loss import build_loss
from cxrdist.model.network import build_model, image_spec
from cxrdist.model.params import param_groups
from cxrdist.model import zero_state
from cxrdist.model.refine import clip_coefficient
from cxrdist.labels.policy import apply_policy, resolve_policy
from cxrdist.training.launcher.notes import say_note
from cxrdist.training.steps.counters import BadSteps, Window
from cxrdist.training.batch_keys import BatchKeyLog
from cxrdist.training.checkpoint import TrainerState, find_resume, load_checkpoint, peek_settings, save_checkpoint, update_state
from cxrdist.training.config import ExperimentConfig, to_dict, to_yaml
from cxrdist.training.cluster.failure import heartbeat_lost
from cxrdist.training.steps.global_mean import GlobalMaskedMean
from cxrdist.training.cluster.heartbeat import start_heartbeat
from cxrdist.training.steps.optimizer_step import GuardedStep
from cxrdist.training.cluster.preempt import EXIT_PREEMPTED, PreemptionFlag, stop_explanation
from cxrdist.training.randomness import model_randomness
from cxrdist.training.resume_settings import check_resume, current_settings, incomparable_score
from cxrdist.training.topology import Topology, resolve
from cxrdist.training.cluster.run_lock import hold_run_lock, release_run_lock
from cxrdist.training.tracking import MetricsLog, log_model_artifact, log_wandb, start_wandb
from cxrdist.wandb_settings import wandb_mode
from cxrdist.training.validation_audit import ValidationAudit


LOG = get_logger("train")

def make_accelerator(cfg: ExperimentConfig, grad_accum: int) -> Accelerator:
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = None if _launcher_set_precision() else ("bf16" if torch.cuda.is_available() else "no")
    log_with = None if wandb_mode(cfg.logging.wandb) == "disabled" else "wandb"
    return distributed.make_accelerator(
        dist_timeout=cfg.train.dist_timeout,
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_dir=str(cfg.run_dir),
        step_scheduler_with_optimizer=False,
    )


def _launcher_set_precision() -> bool:
    return os.environ.get("ACCELERATE_MIXED_PRECISION") not in (None, "")


def graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


class Trainer:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.root, self.manifest = open_datasets(cfg.data.shards, cfg.data.vocabulary)
        self.manifest.check_fold(cfg.fold)
        self.labels = self.manifest.labels
        self.policy = resolve_policy(cfg.data.label_policy, self.labels)
        self.eval_policy = evaluation_policy(cfg.eval.targets, len(self.labels))  # AUC targets, not the training policy
        self.train_splits = self.manifest.train_splits(cfg.fold)
        self.val_split = fold_name(cfg.fold)
        self.audit = ValidationAudit.of(cfg.eval, self.manifest)
        self.topology = self.resolve_topology()
        self.accelerator = make_accelerator(cfg, self.topology.grad_accum)
        self.heartbeat = start_heartbeat(cfg.train.heartbeat_timeout, on_lost=heartbeat_lost)  # once the process group exists
        self.check_world_size()
        self.check_engine()
        acc = self.accelerator
        self.run_dir = cfg.run_dir
        self.is_cuda = acc.device.type == "cuda"
        set_seed(cfg.seed)
        model = build_model(cfg.model, len(self.labels))
        self.image = image_spec(cfg.model, cfg.data.img_size)
        if self.is_cuda and cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.stream = StreamConfig(self.image, batch_size=cfg.data.batch_size, workers=resolve_workers(cfg.data.workers),
                                   shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, augment=cfg.data.augment,
                                   partitions=self.topology.partitions)
        eval_bs = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
        self.eval_stream = StreamConfig(**{**self.stream.__dict__, "batch_size": eval_bs, "augment": "cpu"})
        self.normalisation = tuple(t.to(acc.device) for t in normalisation(self.image))
        self.steps_per_epoch = steps_per_epoch(self.manifest, self.train_splits, self.topology.global_batch)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        # Fused AdamW takes the non-finite-step decision as a device tensor (`found_inf`), so the
        # guard needs no host sync; DeepSpeed wraps the optimizer in its own and keeps the default.
        optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, fused=not self.deepspeed)
        self.compiled = self.compiles()
        if self.compiled:
            model = torch.compile(model, backend=cfg.train.compile_backend)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = self.make_scheduler()  # not checkpointed: a pure function of the step (no pickle to load)
        self.guard = GuardedStep(acc, self.model, self.optimizer, self.deepspeed, cfg.train.grad_clip)
        self.net = acc.unwrap_model(self.model)
        if hasattr(self.net, "_orig_mod"):
            self.net = self.net._orig_mod
        self.check_proximal_engine()
        self.match_buffers_to_weights()
        self.ema = ModelEma(self.net, decay=cfg.train.ema_decay, warmup=cfg.train.ema_warmup, warmup_power=cfg.train.ema_warmup_power)
        self.loss_fn = build_loss(cfg.loss, len(self.labels))
        self.preempt = PreemptionFlag().install()
        self.log = MetricsLog(self.run_dir / METRICS_LOG, acc.is_main_process)
        self.state = TrainerState(dataset=self.manifest.identity())
        self.bad_steps = BadSteps(acc.device)
        self.loss_finite = torch.ones((), dtype=torch.bool, device=acc.device)  # of the current accumulation group
        self.global_mean = GlobalMaskedMean(acc.num_processes, self.topology.grad_accum)
        self.pending: deque[dict] = deque()  # the rest of the current accumulation group
        self.group_batch = 0  # this rank's micro-batches of the current accumulation group done
        self.batch_keys = BatchKeyLog(self.run_dir, cfg.logging.batch_keys, acc)

    # ---- setup -------------------------------------------------------------------------------
    def compiles(self) -> bool:
        train = self.cfg.train
        if not train.compile:
            return False
        if self.is_cuda or train.compile_devices == "all":
            if train.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise UserError(f"train.compile_backend: {train.compile_backend!r} is not a torch.compile backend "
                                f"({', '.join(torch._dynamo.list_backends())})")
            return True
        self.say(f"train.compile is for CUDA only: not compiling on {self.accelerator.device.type} (train.compile_devices=all would)")
        return False

    def check_engine(self) -> None:
        acc = self.accelerator
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if not self.deepspeed:
            return
        plugin = acc.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise UserError("DeepSpeed ZeRO-3 is not supported: EMA and evaluation need whole parameters; "
                            "use ZeRO-1 or ZeRO-2 (launch/deepspeed_zero2.yaml)")
        # Our loaders do not go through accelerate.prepare, so fill the "auto" fields it would have
        # taken from a loader, and take clipping from the config rather than accelerate's default.
        ds = plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = self.cfg.data.batch_size
        if ds.get("train_batch_size") == "auto":
            ds["train_batch_size"] = self.topology.global_batch
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = self.cfg.train.grad_clip

    def check_proximal_engine(self) -> None:
        """The proximal step edits the weights the optimizer steps: the module's A, or under DeepSpeed ZeRO-1/2 (and its
        bf16 optimizer) A's fp32 master copy. An engine that keeps a master copy out of reach (DeepSpeed fp16 without
        ZeRO) would undo every step, silently: refused. A collective (every rank calls it)."""
        refine = self.net.refine
        if not self.deepspeed or refine is None or refine.sparsity_mode != "proximal":
            return
        in_optimizer = any(p is refine.weight for group in self.optimizer.param_groups for p in group["params"])
        if not in_optimizer and zero_state.full_master(refine.weight) is None:
            raise UserError("model.refine.sparsity=proximal: this DeepSpeed configuration keeps A's master weights out of reach "
                            "(use ZeRO-1 or ZeRO-2, e.g. launch/deepspeed_zero2.yaml, or model.refine.sparsity=subgradient)")

    def match_buffers_to_weights(self) -> None:
        """DeepSpeed (0.19 on) casts the weights to bf16/fp16 but leaves buffers in fp32 unless its config names a
        `data_types.buffer_dtype`; BatchNorm then stops at the first forward (weights bf16, running stats fp32).
        Cast the floating buffers with the weights, as `module.bfloat16()` did in older DeepSpeed."""
        if not self.deepspeed:
            return
        dtype = next(self.net.parameters()).dtype
        for buffer in self.net.buffers():
            if buffer.is_floating_point() and buffer.dtype != dtype:
                buffer.data = buffer.data.to(dtype)

    def resolve_topology(self) -> Topology:
        """Global batch, micro-batch and partitions of this start (training/topology.py). Their auto values (0) come from
        the checkpoint this start will resume from, peeked at here to size the accelerator; fit() checks it fully."""
        data, train = self.cfg.data, self.cfg.train
        recorded = peek_settings(self.cfg.run_dir, train.resume)
        sizes = [shard.num_samples for shard in train_shards(self.manifest, self.train_splits)]
        return resolve(data.batch_size, train.global_batch, train.grad_accum, data.partitions, distributed.world_size(), recorded, sizes)

    def check_world_size(self) -> None:
        """CXRDIST_EXPECT_WORLD_SIZE (set by slurm/ and the tests) guards against a launcher that
        silently started fewer processes than asked for (e.g. `accelerate launch --cpu`)."""
        expected = os.environ.get("CXRDIST_EXPECT_WORLD_SIZE")
        if expected and int(expected) != self.accelerator.num_processes:
            raise UserError(f"expected {expected} processes but this one sees a world of {self.accelerator.num_processes}; check the launcher flags")

    def make_scheduler(self) -> CosineLRScheduler:
        t = self.cfg.train
        warmup = min(t.warmup_steps, max(self.total_steps - 1, 0))
        return CosineLRScheduler(
            self.optimizer, t_initial=max(self.total_steps - warmup, 1), lr_min=t.lr * t.min_lr_ratio,
            warmup_t=warmup, warmup_lr_init=t.lr * 0.01 if warmup else 0.0, warmup_prefix=True, t_in_epochs=False,
        )

    def write_run_files(self) -> None:
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / CONFIG_FILE, to_yaml(self.cfg))

    def resume(self) -> tuple[Path, TrainerState] | None:
        found = find_resume(self.run_dir, self.cfg.train.resume, self.say)
        if found is None:
            return None
        path, state = found
        if state.dataset != self.manifest.identity():
            what = ("records no dataset identity" if not state.dataset
                    else f"was trained on other shards (labels {state.dataset.get('labels')}, seed {state.dataset.get('seed')})")
            raise UserError(
                f"checkpoint {path} {what}, not {display(self.root)} (labels {self.labels}, seed {self.manifest.seed}): "
                "resuming would mix label meanings or folds; use another experiment name or train.resume=never"
            )
        return found

    def checked_settings(self, found: tuple[Path, TrainerState] | None) -> dict:
        """The settings to record in this run's checkpoints, after checking them against the checkpoint resumed from
        (the number of processes and loader workers may differ: the sample order does not depend on them)."""
        shards = [shard.file for shard in self.manifest.shards(self.train_splits)]
        settings = current_settings(to_dict(self.cfg), self.stream.workers, self.topology, shards)
        if found is not None:
            check_resume(found[0], found[1].settings, settings, self.cfg.train.resume_changes == "allow", self.say)
        return settings

    def best_on_disk(self) -> tuple[float, int] | None:
        """(macro AUC, step) of the exported best model: it may be newer than the checkpoint resumed from."""
        try:
            card = ModelCard.read(self.run_dir / BEST_DIR)
            if card.dataset == self.manifest.identity() and card.evaluation.targets == self.cfg.eval.targets and card.image == self.image:
                return float(card.metrics["ema"]["macro_auc"]), card.step
        except (UserError, OSError, KeyError, TypeError):
            pass  # no best model yet, or one this run cannot use: the checkpoint's own best stands
        return None

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> int:
        acc = self.accelerator
        distributed.check_shared_directory(acc, self.run_dir)
        self.run_lock = hold_run_lock(acc, self.run_dir)  # one run per run directory, until this process ends
        found = self.resume()
        resume_from = found[0] if found else None
        start_batch = self.topology.first_rank_batch(found[1].step) if found else 0
        settings = self.checked_settings(found)
        self.write_run_files()  # after the checks: a refused resume leaves the run's config.yaml as it was
        # The loader iterator draws a seed from the global RNG when it is created: create it before
        # the checkpoint's RNG state is restored, in a fresh run and a resumed one alike.
        batches = iter(train_loader(self.root, self.manifest, self.train_splits, self.stream, acc.process_index, acc.num_processes,
                                    start_batch=start_batch))
        if resume_from is not None:
            self.state = load_checkpoint(acc, self.ema, resume_from, self.say)
            self.bad_steps = BadSteps(acc.device, self.state.bad_steps_in_row)
            self.scheduler.step_update(num_updates=self.state.step)
            if stale := incomparable_score(self.state.settings, settings):
                self.state.best_auc, self.state.best_step = float("-inf"), -1  # scored under the old rule or resize: not comparable
                self.say(f"{' and '.join(stale)} changed: the stored best is not compared with this run's evaluations")
            best = self.best_on_disk()
            if best is not None and best[0] > self.state.best_auc:
                self.state.best_auc, self.state.best_step = best
            self.say(f"resumed from {resume_from} (step {self.state.step}, epoch {self.state.epoch})")
        self.state.settings = settings
        self.batch_keys.start(self.state.step)
        self.state.wandb_id = start_wandb(acc, self.cfg, to_dict(self.cfg), self.state.wandb_id)
        self.say(f"training fold {self.cfg.fold} on {acc.num_processes} process(es): {self.steps_per_epoch} steps/epoch x "
                 f"{self.cfg.train.epochs} epochs, {self.topology.describe()}")
        self.note("ema_schedule", self.ema_schedule_line())
        code = self.train_until_done(batches)
        if self.heartbeat is not None:
            self.heartbeat.stop()  # past the last collective: this rank's silence is no longer a loss
        acc.end_training()
        release_run_lock(self.run_lock)
        return code

    def ema_schedule_line(self) -> str:
        t = self.cfg.train
        if not t.ema_warmup:
            return f"EMA decay {t.ema_decay} from the first step (train.ema_warmup=false)"
        reached = math.ceil((1 - t.ema_decay) ** (-1 / t.ema_warmup_power)) if t.ema_decay > 0 else 0  # timm's step counts from 1
        last = self.ema.decay_at(self.total_steps)
        return (f"EMA decay min({t.ema_decay}, 1 - step^-{t.ema_warmup_power:g}): reached at step {reached:,}; "
                f"this run's {self.total_steps:,} steps end at {last:.5f}"
                + ("" if reached <= self.total_steps else " (set train.ema_warmup=false or a larger train.ema_warmup_power to get there)"))

    def train_until_done(self, batches) -> int:
        acc, cfg = self.accelerator, self.cfg
        bar = progress(self.total_steps, f"fold {cfg.fold}", "step", enabled=acc.is_main_process and cfg.logging.progress, initial=self.state.step)
        if self.state.step >= self.total_steps:
            self.say(f"already complete at step {self.state.step} (best EMA macro AUC {self.state.best_auc:.4f})")
            return 0
        window = Window()
        self.model.train()
        evaluated_at = checkpointed_at = -1
        while self.state.step < self.total_steps:
            tic = time.perf_counter()
            batch = self.next_micro_batch(batches)
            window.wait += time.perf_counter() - tic
            stepped = self.train_batch(batch, window)
            window.total += time.perf_counter() - tic
            if not stepped:
                continue
            bar.update(1)
            epoch_end = self.state.step % self.steps_per_epoch == 0
            if epoch_end:
                self.state.epoch = self.state.step // self.steps_per_epoch
            logged = self.state.step % cfg.train.log_every == 0 or epoch_end
            if logged:
                self.log_train(window, bar)
                window = Window()
            if self.due(cfg.train.eval_every, epoch_end):
                self.evaluate()
                evaluated_at = self.state.step
            if self.due(cfg.train.checkpoint_every, epoch_end):
                self.checkpoint()
                checkpointed_at = self.state.step
            # Agreeing across ranks is an all-reduce read on the host (a sync): only on steps that log anyway.
            if (logged or acc.num_processes == 1) and self.preempt.agreed(acc):
                if checkpointed_at != self.state.step:
                    self.checkpoint()
                self.say(f"preempted ({self.preempt.signal_name or 'signal on another rank'}): checkpoint at step {self.state.step} written, "
                         f"exiting with {EXIT_PREEMPTED}; {stop_explanation(self.preempt.signal_name)}")
                bar.close()
                return EXIT_PREEMPTED
        bar.close()
        if evaluated_at != self.state.step:
            self.evaluate()
            if checkpointed_at == self.state.step and self.accelerator.is_main_process:
                update_state(self.run_dir, self.state)  # that checkpoint was written before this evaluation
        if checkpointed_at != self.state.step:
            self.checkpoint()
        self.say(f"done: best EMA macro AUC {self.state.best_auc:.4f} at step {self.state.best_step}; model in {self.run_dir / BEST_DIR}")
        self.report_inert_refinement()
        return 0

    def report_inert_refinement(self) -> None:
        """The last log line and a metrics.jsonl record when the exported A is (nearly) all zero."""
        refine = self.ema.module.refine
        if refine is None or not self.accelerator.is_main_process:
            return
        best = self.run_dir / BEST_DIR / WEIGHTS_FILE
        coupling = load_file(str(best))["refine.weight"].float().numpy() if best.is_file() else refine.weight.detach().float().cpu().numpy()
        message = inert_message(coupling, refine.alpha, refine.l1)
        self.log.write({"kind": "refinement", "step": self.state.step, "inert": message is not None, "message": message,
                        "max_logit_shift": max_logit_shift(coupling, refine.alpha), "knob": KNOB})
        if message:
            self.note("inert_refinement", message, at_end=True)

    def checkpoint(self) -> None:
        self.settle_bad_steps()
        save_checkpoint(self.accelerator, self.ema, self.state, self.run_dir, self.cfg.train.keep_checkpoints)

    def due(self, every: int, epoch_end: bool) -> bool:
        return (every > 0 and self.state.step % every == 0) or (every <= 0 and epoch_end)

    def to_input(self, images: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        images = images.to(self.accelerator.device, non_blocking=True)
        dtype = next((model or self.net).parameters()).dtype
        if dtype != images.dtype:  # DeepSpeed bf16/fp16 casts the model itself, so the inputs follow
            images = images.to(dtype)
        if self.is_cuda and self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def next_micro_batch(self, batches) -> dict:
        """The next micro-batch; at the start of an accumulation group all K are drawn first so that the
        loss can be normalised by the group's unmasked entries over all ranks (training/steps/global_mean.py)."""
        if not self.pending:
            self.pending.extend(next(batches) for _ in range(self.topology.grad_accum))
            masks = [apply_policy(b["labels_raw"], self.policy)[1] for b in self.pending]
            self.global_mean.start_group(masks, lambda t: self.accelerator.reduce(t, reduction="sum"), self.accelerator.device)
        return self.pending.popleft()

    def train_batch(self, batch: dict, window: Window) -> bool:
        """One micro-batch; returns True when it completed an optimizer step (taken or skipped)."""
        acc = self.accelerator
        targets, mask = (t.to(acc.device, non_blocking=True) for t in apply_policy(batch["labels_raw"], self.policy))
        images = batch["image"]
        if "augment" in batch:  # data.augment=device: the workers only decoded
            images = augment_batch(images.to(acc.device, non_blocking=True), batch["augment"], self.image, self.normalisation)
        with acc.accumulate(self.model):
            micro_batch = self.topology.global_micro_batch(acc.process_index, self.topology.first_rank_batch(self.state.step) + self.group_batch)
            with acc.autocast(), model_randomness(self.cfg.seed, micro_batch, acc.device):
                logits = self.model(self.to_input(images))
            loss = self.global_mean(self.loss_fn.masked_sum(logits, targets, mask))
            if self.net.refine is not None:
                loss = loss + self.net.refine.l1_penalty()
            acc.backward(loss)
            self.loss_finite = self.loss_finite & torch.isfinite(loss.detach())  # stays on the device until the step
            self.group_batch += 1
            window.add_batch(len(batch["key"]), int(batch.get("corrupt", 0)), loss.detach())
            self.batch_keys.add(micro_batch, batch["key"])
            if not acc.sync_gradients:
                return False
            self.group_batch = 0
            lr = self.optimizer.param_groups[0]["lr"]
            grad_norm = self.guard.clip()
            skipped = self.guard.step(grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            bad = self.guard.is_bad(skipped, grad_norm, self.loss_finite)
            self.loss_finite = torch.ones((), dtype=torch.bool, device=acc.device)
        self.after_step(lr, skipped, bad, grad_norm, window)
        self.batch_keys.step_done(self.state.step)
        return True

    def after_step(self, lr: float, skipped: torch.Tensor | bool, bad: torch.Tensor | bool, grad_norm: torch.Tensor | None,
                   window: Window) -> None:
        """`skipped`: the optimizer did not step; `bad`: a real non-finite step (not fp16 loss-scale calibration)."""
        st = self.state
        st.step += 1
        window.grad_norm = grad_norm
        self.bad_steps.add(bad)
        if self.net.refine is not None:
            # A skipped step must not shrink A either: the threshold's learning rate is zeroed on the device.
            taken_lr = lr * (~skipped).float() if isinstance(skipped, torch.Tensor) else (0.0 if skipped else lr)
            self.net.refine.proximal_step(taken_lr, self.optimizer, scale=clip_coefficient(grad_norm, self.cfg.train.grad_clip))
        self.scheduler.step_update(num_updates=st.step)
        self.ema.update(self.net, st.step, skipped)  # a skipped step leaves the EMA (README: skipped steps)

    def settle_bad_steps(self) -> None:
        """Read the device-side count of skipped steps into the state (a host sync: at log and checkpoint time only)
        and stop the run if too many came in a row."""
        st = self.state
        st.bad_steps_in_row, worst, total = self.bad_steps.read()
        st.bad_steps_total += total
        if worst >= self.cfg.train.max_bad_steps:
            raise UserError(
                f"{worst} optimizer steps in a row had non-finite gradients (by step {st.step}); "
                "lower train.lr, raise train.warmup_steps, or use bf16 instead of fp16"
            )

    # ---- logging, evaluation ---------------------------------------------------------------------
    def log_train(self, window: Window, bar) -> None:
        acc = self.accelerator
        self.settle_bad_steps()
        totals = acc.reduce(torch.tensor([float(window.loss_sum), window.batches, window.samples, window.corrupt], dtype=torch.float64,
                                         device=acc.device), "sum").tolist()
        loss_sum, n_batches, samples, corrupt = totals
        self.state.samples_seen += int(samples)
        self.state.corrupt_seen += int(corrupt)
        self.check_corrupt()
        record = {
            "kind": "train", "step": self.state.step, "world_size": acc.num_processes, "precision": acc.mixed_precision,
            "epoch": self.state.step / self.steps_per_epoch,
            "loss": loss_sum / max(n_batches, 1), "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": None if window.grad_norm is None else float(window.grad_norm),
            "img_per_s": samples / window.total if window.total > 0 else None,
            "data_wait_fraction": window.wait / window.total if window.total > 0 else None,
            "bad_steps_total": self.state.bad_steps_total, "corrupt_total": self.state.corrupt_seen, "loss_scale": self.guard.loss_scale(),
            "max_memory_gib": torch.cuda.max_memory_allocated(acc.device) / 2**30 if self.is_cuda else None,  # allocator stat: no sync
            "ema_decay": self.ema.decay_at(self.state.step),  # the effective decay of the last update (warm-up included)
        }
        if self.compiled:
            record["graph_breaks"] = graph_break_count()  # this process's, since it started: 0 = one graph for the model
        self.log.write(record)
        log_wandb(acc, {f"train/{k}": v for k, v in record.items() if k not in ("kind", "step")}, self.state.step)
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s'] or 0:.0f}")

    def check_corrupt(self) -> None:
        st = self.state
        seen = st.samples_seen + st.corrupt_seen
        if st.corrupt_seen and st.corrupt_seen / seen > self.cfg.data.max_corrupt_fraction:
            raise UserError(
                f"{st.corrupt_seen} of {seen} training samples failed to decode ({st.corrupt_seen / seen:.2%} > "
                f"data.max_corrupt_fraction={self.cfg.data.max_corrupt_fraction}); run `cxrdist verify {display(self.root)}`"
            )

    def sync_buffers_from_main(self) -> None:
        """BatchNorm running stats are updated locally on each rank (DDP only re-broadcasts rank 0's
        at the next forward), so the live and EMA buffers drift apart across ranks. Evaluate what
        rank 0 saves: its buffers, everywhere."""
        if self.accelerator.num_processes == 1:
            return
        for module in (self.ema.module, self.net):
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def evaluate(self) -> dict:
        acc = self.accelerator
        self.sync_buffers_from_main()
        loader = eval_loader(self.root, self.manifest, [self.val_split], self.eval_stream, acc.process_index, acc.num_processes)
        local = predict({"ema": self.ema.module, "live": self.net}, loader, acc.device, acc.autocast, self.to_input,
                        pad_to=self.eval_stream.batch_size)
        preds = gather_predictions(acc, local)
        check_complete(preds, self.manifest.num_samples([self.val_split]))
        results = score(preds, self.labels, self.eval_policy, self.loss_fn, loss_policy=self.policy)
        self.model.train()
        refine = self.ema.module.refine
        record = {
            "kind": "eval", "step": self.state.step, "epoch": self.state.step / self.steps_per_epoch, "split": self.val_split,
            "eval_targets": self.cfg.eval.targets,
            "ema": results["ema"], "live": results["live"], "corrupt": preds.corrupt,
            "sparsity": refine.sparsity() if refine is not None else None,
            "top_couplings": refine.top_couplings(self.labels, k=10) if refine is not None else [],
        }
        improved = results["ema"]["macro_auc"] > self.state.best_auc
        if improved:
            self.state.best_auc, self.state.best_step = results["ema"]["macro_auc"], self.state.step
        if acc.is_main_process:
            record["subgroups"] = self.audit.run(preds, "ema", self.labels, self.eval_policy)
            self.log.write(record)
            write_predictions_csv(self.run_dir / VAL_PREDICTIONS_FILE, preds, "ema", self.labels, self.eval_policy)
            if improved:
                self.export_best(preds, results)
        couplings = (refine.weight.detach().float().cpu().numpy(), self.labels) if refine is not None else None
        flat = {"val/ema_macro_auc": results["ema"]["macro_auc"], "val/live_macro_auc": results["live"]["macro_auc"],
                "val/ema_loss": results["ema"].get("loss")}
        flat.update({f"val/auc/{k}": v for k, v in results["ema"]["per_label"].items() if v is not None})
        flat.update({f"val/dataset_auc/{k}": v["macro_auc"] for k, v in results["ema"].get("per_dataset", {}).items()})
        flat.update(wandb_values(record.get("subgroups", {}), "val"))
        if record["sparsity"] is not None:
            flat["val/coupling_sparsity"] = record["sparsity"]
        log_wandb(acc, flat, self.state.step, couplings)
        self.say(f"step {self.state.step}: val macro AUC EMA {results['ema']['macro_auc']:.4f}, live {results['live']['macro_auc']:.4f}"
                 + (" (best)" if improved else "")
                 + (f"; per dataset {summary_line(results['ema']['per_dataset'])}" if len(results["ema"].get("per_dataset", {})) > 2 else ""))
        acc.wait_for_everyone()
        return record

    def export_best(self, preds, results) -> None:
        card = ModelCard.build(
            self.cfg.model, self.labels, self.policy, self.image, self.manifest, self.root, experiment=self.cfg.experiment,
            fold=self.cfg.fold, step=self.state.step, epoch=self.state.step / self.steps_per_epoch,
            eval_batch_size=self.eval_stream.batch_size, metrics={"split": self.val_split, "ema": results["ema"], "live": results["live"]},
            evaluation=CardEvaluation.of(self.cfg.eval.targets, self.labels, self.policy),
        )
        best = save_model(self.run_dir / BEST_DIR, self.ema.module, card)
        write_predictions_csv(best / VAL_PREDICTIONS_FILE, preds, "ema", self.labels, self.eval_policy)
        if self.cfg.logging.log_models:
            name = f"{self.cfg.experiment}-{fold_name(self.cfg.fold)}"
            log_model_artifact(self.accelerator, best, name, self.state.step, results["ema"]["macro_auc"])

    def say(self, text: str) -> None:
        if self.accelerator.is_main_process:
            LOG.info(f"cxrdist: {text}")

    def note(self, key: str, text: str, at_end: bool = False) -> None:
        """Said once per command that trains several folds (training/launcher/notes.py), not once per fold."""
        if self.accelerator.is_main_process:
            say_note(key, text, self.cfg.fold, lambda line: LOG.info(f"cxrdist: {line}"), at_end)
