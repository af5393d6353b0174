"""Rank-0 logging: metrics.jsonl always, W&B through accelerate's trackers when enabled."""

from __future__ import annotations

import io
import json
import math
import netrc
import os
from pathlib import Path

import numpy as np


def wandb_mode(configured: str) -> str:
    """auto -> online when an API key is available (env or ~/.netrc), offline otherwise."""
    env = os.environ.get("WANDB_MODE")
    if env in ("disabled", "offline", "online"):
        return env
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def finite(value):
    """JSON has no NaN/inf: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return finite(value.item())
    return value


class MetricsLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(finite(record)) + "\n")


def start_wandb(accelerator, cfg, config_dict: dict, run_id: str) -> str:
    """Initialise the W&B tracker (group = experiment, run = fold); returns the run id to resume with."""
    if "wandb" not in [t.name for t in accelerator.trackers] and not accelerator.log_with:
        return run_id
    init = {"group": cfg.experiment, "name": f"fold-{cfg.fold}", "dir": str(cfg.run_dir), "resume": "allow", "mode": wandb_mode(cfg.logging.wandb)}
    if run_id:
        init["id"] = run_id
    accelerator.init_trackers(cfg.logging.project, config=config_dict, init_kwargs={"wandb": init})
    if accelerator.is_main_process:
        tracker = accelerator.get_tracker("wandb", unwrap=True)
        return getattr(tracker, "id", run_id) or run_id
    return run_id


def coupling_figure_png(matrix: np.ndarray, labels: list[str]) -> bytes:
    """The learned coupling matrix A as a heatmap (PNG bytes), row = source label, column = target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = float(np.abs(matrix).max()) or 1.0
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("target label")
    ax.set_ylabel("source label")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
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
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    artifact = wandb.Artifact(safe, type="model", metadata={"step": step, "macro_auc": finite(float(macro_auc))})
    artifact.add_dir(str(directory))
    run.log_artifact(artifact, aliases=["best", f"step-{step}"])
