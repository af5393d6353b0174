"""Typed experiment config: dataclasses + OmegaConf for YAML files and dotted `key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cxrdist.errors import UserError
from cxrdist.model.config import LossConfig, ModelConfig

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
    # Seconds a collective may wait for the other ranks (the process-group timeout): when a rank or
    # a node dies, the others exit non-zero after at most this long. Long enough for the slowest
    # rank-0-only work between two collectives (writing a checkpoint to the shared filesystem).
    dist_timeout: int = 600


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # online | offline | disabled | auto (online if logged in, else offline)
    project: str = "cxrdist"
    progress: bool = True  # tqdm bar on rank 0


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

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.experiment / f"fold-{self.fold}"


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
        cfg: ExperimentConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        where = f"{path}: " if path else ""
        raise UserError(f"config: {where}{one_line(err)}") from None
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    # YAML reads a bare `no` as false: accept it (and fp32) for "no mixed precision".
    if cfg.train.mixed_precision in ("False", "false", "fp32"):
        cfg.train.mixed_precision = "no"
    checks = [
        (cfg.logging.wandb in WANDB_MODES, f"logging.wandb must be one of {', '.join(WANDB_MODES)}"),
        (cfg.train.mixed_precision in PRECISIONS, f"train.mixed_precision must be one of {', '.join(PRECISIONS)}"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.dist_timeout >= 1, "train.dist_timeout must be >= 1 (seconds)"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
        (cfg.model.refine.sparsity in ("proximal", "subgradient"), "model.refine.sparsity must be proximal or subgradient"),
        (cfg.loss.name in ("asl", "bce"), "loss.name must be asl or bce"),
        ("/" not in cfg.experiment and cfg.experiment not in ("", ".", ".."), "experiment must be a plain name"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"config: {message}")


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
