"""Entry point for `accelerate launch cxrdist/train.py --config configs/X.yaml --fold K [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

# Run as a script, Python puts cxrdist/ itself first on sys.path; drop it so that our module names
# (data, model, labels, ...) never shadow other top-level packages.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cxrdist.training.cluster import elastic  # noqa: E402
from cxrdist.training.launcher import outcome, trainer_stderr  # noqa: E402

trainer_stderr.attach()  # before anything can write to stderr (no-op outside `cxrdist train`)

from cxrdist.log import quiet_third_party  # noqa: E402

quiet_third_party()  # before accelerate imports DeepSpeed

from cxrdist.errors import UserError, one_line  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cxrdist.cli_args import CommandParser, whole

    parser = CommandParser(prog="cxrdist train", description="Train one fold (run under `accelerate launch`).")
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/paper.yaml")
    parser.add_argument("--fold", type=whole(0), default=None, help="held-out fold (overrides the config's `fold`)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)  # a UsageError is a UserError: one line, exit 2
        from cxrdist.training.config import load_config
        from cxrdist.training.loop import Trainer

        cfg = load_config(args.config, args.overrides, fold=args.fold)
        choose_network_interface()
        code = Trainer(cfg).fit()
        outcome.record(code)
        if code != 0:
            elastic.end_on_purpose(None)  # a preemption: the scheduler ends the job, the launcher must not restart it
        return code
    except UserError as err:
        return stop_with_user_error(one_line(err))
    except OSError as err:
        from cxrdist.atomic import filesystem_error

        line = filesystem_error(err)  # a full disk, an unwritable output_dir: one line, like a UserError
        if line is None:
            crashed(err)
        return stop_with_user_error(line)
    except Exception as err:  # noqa: BLE001 - a bug keeps its traceback (crashed re-raises it); a lost peer is one line
        crashed(err)


def stop_with_user_error(words: str) -> int:
    from cxrdist.training.cluster.heartbeat import ending_by_error

    line = f"cxrdist train: error: {words}"
    ending_by_error(line)  # the other ranks stop on it in bounded time, naming it, if it was this rank's alone
    outcome.record(2, line)
    # Every rank raises the same error: one line per machine (on another machine it is the only one there); a
    # launcher that restarts failed trainers must not restart this one (training/cluster/elastic.py).
    elastic.end_on_purpose(line)
    return 2


def crashed(err: Exception) -> NoReturn:
    """A bug (its traceback) or a lost peer (one line, training/cluster/failure.py); called while `err` is being handled."""
    from cxrdist.training.cluster.failure import lost_peer, lost_peer_message, stop_lost_peer
    from cxrdist.training.cluster.heartbeat import ending_by_error

    if not lost_peer(err):
        line = f"cxrdist train: crashed: {type(err).__name__}: {one_line(err)}"
        ending_by_error(line)
        outcome.record(1, line)
        raise err
    stop_lost_peer(lost_peer_message(err))


def choose_network_interface() -> None:
    """Before the process group starts: the interface that routes to MASTER_ADDR, on multi-machine runs."""
    from cxrdist.log import get_logger
    from cxrdist.training.cluster import netif

    choice = netif.configure(os.environ)
    if os.environ.get("LOCAL_RANK", "0") == "0" and choice.reason != "one machine":
        get_logger("train").info(f"cxrdist: {netif.describe(choice)}")


if __name__ == "__main__":
    sys.exit(main())
