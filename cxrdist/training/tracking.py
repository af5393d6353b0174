"""Rank-0 logging: metrics.jsonl always, W&B through accelerate's trackers when enabled."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from cxrdist.atomic import json_line, json_ready
from cxrdist.data.location import redact
from cxrdist.layout import fold_name
from cxrdist.wandb_settings import artifact_safe, wandb_mode


class MetricsLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json_line(record) + "\n")


def start_wandb(accelerator, cfg, config_dict: dict, run_id: str) -> str:
    """Initialise the W&B tracker (group = experiment, run = fold); returns the run id to resume with."""
    if "wandb" not in [t.name for t in accelerator.trackers] and not accelerator.log_with:
        return run_id
    hide_credentials_from_wandb()
    init = {"group": cfg.experiment, "name": fold_name(cfg.fold), "dir": str(cfg.run_dir), "resume": "allow", "mode": wandb_mode(cfg.logging.wandb)}
    if run_id:
        init["id"] = run_id
    accelerator.init_trackers(cfg.logging.project, config=config_dict, init_kwargs={"wandb": init})
    if accelerator.is_main_process:
        tracker = accelerator.get_tracker("wandb", unwrap=True)
        return getattr(tracker, "id", run_id) or run_id
    return run_id


def hide_credentials_from_wandb() -> None:
    """W&B records this process's sys.argv as the run's command line (wandb-metadata.json "args"); a shard URL given
    as an override would bring its user:password or token to the dashboard. The arguments are parsed by now, so
    they are replaced by their display form (the process's own /proc command line is unchanged)."""
    sys.argv[:] = [redact(arg) for arg in sys.argv]


def coupling_figure_png(matrix: np.ndarray, labels: list[str]) -> bytes:
    """The learned coupling matrix A as a heatmap (PNG bytes), the report's figure: row = source label, column = target."""
    from cxrdist.evaluation.figures import coupling_heatmap

    buffer = io.BytesIO()
    coupling_heatmap(buffer, matrix, labels, "coupling matrix A")
    return buffer.getvalue()


def log_wandb(accelerator, values: dict, step: int, couplings: tuple[np.ndarray, list[str]] | None = None) -> None:
    if not accelerator.log_with:
        return
    flat = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
    if couplings is not None and accelerator.is_main_process:
        import wandb
        from PIL import Image

        flat["couplings"] = wandb.Image(Image.open(io.BytesIO(coupling_figure_png(*couplings))))
    accelerator.log(flat, step=step)


def log_model_artifact(accelerator, directory: Path, name: str, step: int, macro_auc: float) -> None:
    """best/ (model.safetensors + model.json + predictions) as a W&B model artifact, aliased best and step-N."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    artifact = wandb.Artifact(artifact_safe(name), type="model", metadata={"step": step, "macro_auc": json_ready(float(macro_auc))})
    artifact.add_dir(str(directory))
    run.log_artifact(artifact, aliases=["best", f"step-{step}"])
