"""The W&B mode a run or a report upload uses (the config's `logging.wandb`, WANDB_MODE, an API key), and the names W&B
accepts for artifacts: shared by the trainer's tracking (training/tracking.py) and the report's dashboards
(evaluation/report/dashboard.py), which must not import the trainer."""

from __future__ import annotations

import netrc
import os

from cxrdist.errors import UserError

WANDB_OWN_MODES = ("shared", "dryrun", "run")  # WANDB_MODE values wandb takes besides online, offline, disabled


def check_wandb_mode_variable() -> None:
    """A WANDB_MODE that wandb refuses (with a page of pydantic) is one line, before any work."""
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in ("disabled", "offline", "online", *WANDB_OWN_MODES):
        raise UserError(f"WANDB_MODE={env!r} in the environment: expected online, offline or disabled (or unset it; "
                        "logging.wandb in the config chooses too)")


def wandb_mode(configured: str) -> str:
    """auto -> online when an API key is available (env or ~/.netrc), offline otherwise."""
    check_wandb_mode_variable()
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


def artifact_safe(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
