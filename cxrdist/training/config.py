"""Typed experiment config: dataclasses + OmegaConf for YAML files and dotted `key=value` overrides."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from cxrdist.distributed import DEFAULT_DIST_TIMEOUT
from cxrdist.errors import UserError
from cxrdist.labels.eval_targets import EVAL_TARGETS
from cxrdist.layout import run_dir
from cxrdist.model.config import LossConfig, ModelConfig, one_of, within

WANDB_MODES = ("auto", "online", "offline", "disabled")
PRECISIONS = ("auto", "no", "bf16", "fp16")
AUGMENT_MODES = ("cpu", "device")
COMPILE_DEVICES = ("cuda", "all")
RESUME_CHANGES = ("refuse", "allow")


@dataclass
class DataConfig:
    # directory or URL written by `cxrdist prepare` (with manifest.json), or a list of them (several datasets:
    # each entry a location or {location, name, weight, label_map}, cxrdist/data/datasets.py)
    shards: Any = MISSING
    vocabulary: Any = None  # several datasets: the model's label names (default: the union of the harmonised labels)
    img_size: int = 380
    batch_size: int = 32  # the micro-batch: samples per forward of one process (train.global_batch: per optimizer step)
    eval_batch_size: int = 0  # 0 = 2 x batch_size
    workers: int = -1  # DataLoader workers per process; -1 = from the CPUs per process (stream.resolve_workers)
    augment: str = "cpu"  # train augmentation in the workers (cpu) or as one batched grid_sample on the accelerator (device)
    shuffle_buffer: int = 1000  # samples one canonical partition shuffles at a time (data/order.py)
    # Canonical partitions of the sample order (data/order.py): the order is the same on every number of processes that
    # divides it. 0 = chosen at the run's first start (48; fewer for a small dataset; a multiple of the world size) and
    # kept by its resumes.
    partitions: int = 0
    # "default" (CheXpert paper: U-Ones for Atelectasis and Edema, U-Zeros otherwise), "ignore",
    # "zeros", "ones", or a mapping {label: policy, default: policy}.
    label_policy: Any = "default"
    max_corrupt_fraction: float = 0.001  # stop when more samples than this fraction fail to decode

    def __post_init__(self) -> None:
        at_least("data.batch_size", self.batch_size, 1)
        at_least("data.img_size", self.img_size, 16)
        at_least("data.eval_batch_size", self.eval_batch_size, 0)
        at_least("data.shuffle_buffer", self.shuffle_buffer, 0)
        at_least("data.partitions", self.partitions, 0)
        within("data.max_corrupt_fraction", self.max_corrupt_fraction, 0.0, 1.0)
        if self.workers < -1:
            raise UserError(f"data.workers must be >= 0, or -1 for one per CPU of this process, got {self.workers}")
        one_of("data.augment", self.augment, AUGMENT_MODES)


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 2e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 500
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # 0 = off
    # Samples per optimizer step, whatever the number of processes (training/topology.py): each process accumulates
    # global_batch / (data.batch_size x processes) micro-batches. 0 = data.batch_size x processes x grad_accum at the
    # run's first start, kept by its resumes.
    global_batch: int = 0
    grad_accum: int = 1  # with global_batch 0 only
    ema_decay: float = 0.9998
    ema_warmup: bool = True  # timm's ramp: decay(step) = min(ema_decay, 1 - step^-ema_warmup_power), step from 1
    ema_warmup_power: float = 0.6667  # 2/3 (timm): 0.99 at step 1e3, 0.999 at 3.2e4, 0.9998 only at 3.5e5
    mixed_precision: str = "auto"  # auto = what `accelerate launch` says, else bf16 on CUDA and fp32 on CPU
    compile: bool = False  # torch.compile of the model (on CUDA only, unless compile_devices=all)
    compile_devices: str = "cuda"  # cuda | all (on CPU, inductor takes minutes to compile: for tests and checks)
    compile_backend: str = "inductor"  # any torch.compile backend; aot_eager traces forward and backward without code generation
    channels_last: bool = True  # CUDA only
    eval_every: int = 0  # optimizer steps; 0 = at the end of every epoch
    checkpoint_every: int = 0  # optimizer steps; 0 = at the end of every epoch
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto = newest complete checkpoint in the run dir | never | PATH
    # refuse | allow: resuming a checkpoint trained under other settings (training/resume_settings.py)
    resume_changes: str = "refuse"
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    log_every: int = 10
    # Seconds a collective may wait for the other ranks (the process-group timeout): when a rank or
    # a node dies, the others exit non-zero after at most this long. Long enough for the slowest
    # rank-0-only work between two collectives (writing a checkpoint to the shared filesystem).
    dist_timeout: int = DEFAULT_DIST_TIMEOUT
    # Seconds a rank may go unheard (training/cluster/heartbeat.py) before every other rank stops with one line: a node
    # that vanished is noticed this long after, not at TCP's ~15 minutes. Beats come from a thread, so a long
    # evaluation or checkpoint does not count; only a dead process, a frozen one or a dark link does. 0 = off.
    heartbeat_timeout: int = 120

    def __post_init__(self) -> None:
        # YAML reads a bare `no` as false: accept it (and fp32) for "no mixed precision".
        if self.mixed_precision in ("False", "false", "fp32"):
            self.mixed_precision = "no"
        one_of("train.mixed_precision", self.mixed_precision, PRECISIONS)
        one_of("train.compile_devices", self.compile_devices, COMPILE_DEVICES)
        one_of("train.resume_changes", self.resume_changes, RESUME_CHANGES)
        at_least("train.grad_accum", self.grad_accum, 1)
        at_least("train.global_batch", self.global_batch, 0)
        at_least("train.epochs", self.epochs, 1)
        at_least("train.dist_timeout", self.dist_timeout, 1)
        at_least("train.heartbeat_timeout", self.heartbeat_timeout, 0)
        at_least("train.keep_checkpoints", self.keep_checkpoints, 1)
        at_least("train.warmup_steps", self.warmup_steps, 0)
        at_least("train.log_every", self.log_every, 1)
        at_least("train.eval_every", self.eval_every, 0)
        at_least("train.checkpoint_every", self.checkpoint_every, 0)
        at_least("train.max_bad_steps", self.max_bad_steps, 1)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"train.lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UserError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.ema_warmup_power > 0:
            raise UserError(f"train.ema_warmup_power must be > 0, got {self.ema_warmup_power}")


@dataclass
class EvalConfig:
    # What every AUC is scored against, independent of data.label_policy (cxrdist/labels/eval_targets.py):
    # ignore_uncertain (uncertain entries left out of that label's AUC) | zeros | ones.
    targets: str = "ignore_uncertain"
    # The subgroup audit of every validation (cxrdist/training/validation_audit.py): a group of fewer patients is
    # reported as "too few patients"; patient-bootstrap resamples of its intervals (0: none, so no flags); attribute
    # pairs to cross, e.g. ["sex,age"].
    audit_min_patients: int = 20
    audit_resamples: int = 200
    audit_intersections: Any = field(default_factory=list)

    def __post_init__(self) -> None:
        one_of("eval.targets", self.targets, EVAL_TARGETS)
        at_least("eval.audit_min_patients", self.audit_min_patients, 1)
        at_least("eval.audit_resamples", self.audit_resamples, 0)


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # online | offline | disabled | auto (online if logged in, else offline)
    project: str = "cxrdist"
    progress: bool = True  # tqdm bar on rank 0
    log_models: bool = False  # upload best/ as a W&B model artifact each time it improves
    # Write every optimizer step's sample keys to batch_keys.jsonl (rank 0 gathers them: one collective per step; for checks)
    batch_keys: bool = False

    def __post_init__(self) -> None:
        one_of("logging.wandb", self.wandb, WANDB_MODES)


@dataclass
class ExperimentConfig:
    experiment: str = "cxrdist"
    output_dir: str = "runs"
    seed: int = 0
    fold: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if "/" in self.experiment or self.experiment in ("", ".", ".."):
            raise UserError(f"experiment must be a plain name, got {self.experiment!r}")
        at_least("seed", self.seed, 0)
        at_least("fold", self.fold, 0)

    @property
    def run_dir(self) -> Path:
        return run_dir(self.output_dir, self.experiment, self.fold)


def one_line(err: OmegaConfBaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {text}" if key and key not in text else text


def load_config(path: Path | None, overrides: list[str] = (), fold: int | None = None) -> ExperimentConfig:
    """Defaults <- YAML file <- dotted overrides (<- --fold). Unknown keys and wrong types are UserErrors."""
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise UserError(f"--config {path}: no such file")
            layers.append(anchor_paths(load_yaml(Path(path)), Path(path).absolute().parent))
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        merged = OmegaConf.merge(*layers)
        for item in overrides:
            merged = merge_override(merged, schema, item)
        if fold is not None:
            merged = OmegaConf.merge(merged, {"fold": fold})
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise UserError(f"config: required key(s) not set: {', '.join(missing)}")
        if path is not None:
            check_anchored_shards(merged, layers[-1], Path(path))
        cfg: ExperimentConfig = to_object(merged)
    except OmegaConfBaseException as err:
        where = f"{path}: " if path else ""
        raise UserError(f"config: {where}{one_line(err)}") from None
    return cfg


# ---------------------------------------------------------------- relative paths in a config file
# An input named in a config file (a data.shards location, model.pretrained_path) that is a relative path resolves against
# the folder of the config file, so a config means the same data wherever it is run from; a dotted override on the command
# line is resolved against the working directory, like any path typed there; output_dir too (outputs go where you run,
# as every --out, and runs started before this rule keep resuming in place).


def anchor_paths(layer: DictConfig, folder: Path) -> DictConfig:
    """The config file's layer with its relative input paths made absolute against `folder`."""
    data = OmegaConf.to_container(layer, resolve=False)
    section = data.get("data")
    if isinstance(section, dict) and "shards" in section:
        shards = section["shards"]
        if isinstance(shards, list):
            section["shards"] = [{**item, "location": anchored(item["location"], folder)} if isinstance(item, dict) and "location" in item
                                 else anchored(item, folder) for item in shards]
        else:
            section["shards"] = anchored(shards, folder)
    model = data.get("model")
    if isinstance(model, dict) and "pretrained_path" in model:
        model["pretrained_path"] = anchored(model["pretrained_path"], folder)
    return OmegaConf.create(data)


def anchored(value, folder: Path):
    """`value` against `folder` when it is a relative local path (a URL, an absolute path, an interpolation stay as they are)."""
    from cxrdist.data.location import is_url

    if not isinstance(value, str) or not value or is_url(value) or "${" in value or Path(value).expanduser().is_absolute():
        return value
    return os.path.normpath(folder / value)


def check_anchored_shards(merged: DictConfig, layer: DictConfig, path: Path) -> None:
    """A data.shards location the config file gave relative that is not there against its folder but is against the working
    directory: one line that says so (a config written when relative paths meant the working directory)."""
    from cxrdist.data.location import is_url

    def locations(shards) -> set[str]:
        items = shards if isinstance(shards, (list, tuple)) else [shards]
        found = [item.get("location") if isinstance(item, dict) else item for item in items]  # any shape: checked where read
        return {item for item in found if isinstance(item, str) and not is_url(item)}

    given = OmegaConf.to_container(layer, resolve=False).get("data")
    final = OmegaConf.to_container(merged, resolve=False)["data"]["shards"]
    folder = path.absolute().parent
    for location in locations(given.get("shards") if isinstance(given, dict) else None) & locations(final):
        written = os.path.relpath(location, folder)
        if not Path(location).exists() and Path(written).exists():
            raise UserError(f"--config {path}: data.shards {written!r} is read relative to the config file's folder, {folder}, "
                            f"where there is no such directory; the working directory has one: write "
                            f"{os.path.relpath(Path(written).absolute(), folder)!r} or an absolute path in the config")


def load_yaml(path: Path) -> DictConfig:
    """A YAML config file that must be a mapping of settings."""
    import yaml

    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"--config {path}: not valid YAML{at} ({getattr(err, 'problem', None) or type(err).__name__})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config {path}: cannot be read ({err})") from None
    if not isinstance(layer, DictConfig):
        raise UserError(f"--config {path}: expected a mapping of settings (key: value), got a {type(layer).__name__}")
    return layer
def merge_override(merged: DictConfig, schema: DictConfig, item: str) -> DictConfig:
    """One command-line override on top of the config; its error names the override, not the config file."""
    try:
        return OmegaConf.merge(merged, overrides_layer(schema, [item]))
    except OmegaConfBaseException as err:
        raise UserError(f"override {item!r} (command line): {one_line(err)}") from None


def overrides_layer(schema: DictConfig, overrides) -> DictConfig:
    """Dotted overrides; a string setting keeps the user's text (YAML would turn `experiment=on` into True)."""
    layer = OmegaConf.create()
    for item in overrides:
        key, value = item.split("=", 1)
        if is_string_setting(schema, key):
            OmegaConf.update(layer, key, value, force_add=True)
        else:
            layer = OmegaConf.merge(layer, OmegaConf.from_dotlist([item]))
    return layer


def is_string_setting(schema: DictConfig, key: str) -> bool:
    node = schema
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return isinstance(node, StringNode)


def to_object(merged) -> ExperimentConfig:
    """The typed config; every section's __post_init__ checks its own fields."""
    try:
        return OmegaConf.to_object(merged)
    except UserError as err:
        raise UserError(f"config: {err}") from None


def at_least(field_name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{field_name} must be >= {minimum}, got {value}")


def recorded(cfg: ExperimentConfig) -> DictConfig:
    """The config as written to config.yaml and W&B: a user:password or token in a shard URL left out."""
    from cxrdist.data.location import display

    record = OmegaConf.structured(cfg)
    shards = cfg.data.shards
    if isinstance(shards, (list, tuple)):
        record.data.shards = [{**entry, "location": display(str(entry["location"]))} if isinstance(entry, dict) else display(str(entry))
                              for entry in shards]
    else:
        record.data.shards = display(shards)
    return record


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(recorded(cfg))


def to_dict(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(recorded(cfg), resolve=True)
