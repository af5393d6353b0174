"""Typed experiment config: dataclasses + OmegaConf for YAML files and dotted `key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cxrdist.errors import UserError
from cxrdist.layout import run_dir
from cxrdist.model.config import LossConfig, ModelConfig, one_of

WANDB_MODES = ("auto", "online", "offline", "disabled")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class DataConfig:
    shards: str = MISSING  # directory written by `cxrdist prepare` (with manifest.json)
    img_size: int = 380
    batch_size: int = 32  # per device (per process)
    eval_batch_size: int = 0  # 0 = 2 x batch_size
    workers: int = 4  # DataLoader workers per process
    shuffle_buffer: int = 1000
    # "default" (CheXpert paper: U-Ones for Atelectasis and Edema, U-Zeros otherwise), "ignore",
    # "zeros", "ones", or a mapping {label: policy, default: policy}.
    label_policy: Any = "default"
    max_corrupt_fraction: float = 0.001  # stop when more samples than this fraction fail to decode

    def __post_init__(self) -> None:
        at_least("data.batch_size", self.batch_size, 1)
        at_least("data.workers", self.workers, 0)


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 2e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 500
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1
    ema_decay: float = 0.9998
    ema_warmup: bool = True
    mixed_precision: str = "auto"  # auto = what `accelerate launch` says, else bf16 on CUDA and fp32 on CPU
    compile: bool = False  # torch.compile, CUDA only
    channels_last: bool = True  # CUDA only
    eval_every: int = 0  # optimizer steps; 0 = at the end of every epoch
    checkpoint_every: int = 0  # optimizer steps; 0 = at the end of every epoch
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto = newest complete checkpoint in the run dir | never | PATH
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    log_every: int = 10

    def __post_init__(self) -> None:
        # YAML reads a bare `no` as false: accept it (and fp32) for "no mixed precision".
        if self.mixed_precision in ("False", "false", "fp32"):
            self.mixed_precision = "no"
        one_of("train.mixed_precision", self.mixed_precision, PRECISIONS)
        at_least("train.grad_accum", self.grad_accum, 1)
        at_least("train.epochs", self.epochs, 1)
        at_least("train.keep_checkpoints", self.keep_checkpoints, 1)
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # online | offline | disabled | auto (online if logged in, else offline)
    project: str = "cxrdist"
    progress: bool = True  # tqdm bar on rank 0

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
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if "/" in self.experiment or self.experiment in ("", ".", ".."):
            raise UserError(f"experiment must be a plain name, got {self.experiment!r}")

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
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        if fold is not None:
            layers.append(OmegaConf.create({"fold": fold}))
        merged = OmegaConf.merge(*layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise UserError(f"config: required key(s) not set: {', '.join(missing)}")
        cfg: ExperimentConfig = to_object(merged)
    except OmegaConfBaseException as err:
        where = f"{path}: " if path else ""
        raise UserError(f"config: {where}{one_line(err)}") from None
    return cfg


def to_object(merged) -> ExperimentConfig:
    """The typed config; every section's __post_init__ checks its own fields."""
    try:
        return OmegaConf.to_object(merged)
    except UserError as err:
        raise UserError(f"config: {err}") from None


def at_least(field_name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{field_name} must be >= {minimum}, got {value}")


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
