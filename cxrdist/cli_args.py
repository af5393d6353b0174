"""How `cxrdist` (and the train.py script) read their command lines: errors in one line, dotted overrides anywhere
among the options, and numeric options checked where they are read, before any work starts."""

from __future__ import annotations

import argparse
import math

from cxrdist.errors import UserError


class UsageError(UserError):
    """A command line argparse refused; `prog` is the (sub)command it was for, e.g. "cxrdist evaluate"."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see `{prog} --help`)")
        self.prog = prog


class CommandParser(argparse.ArgumentParser):
    """argparse, with two changes. An error is a UsageError (a UserError: one line and exit 2 where the command's
    errors are caught), not the usage block. Positionals may come between options (`train --config C a=1 --fold 0
    b=2`): every command whose overrides are a positional list would otherwise refuse the second group as
    "unrecognized arguments"."""

    _intermixing = False

    def error(self, message: str):
        raise UsageError(self.prog, message)

    def parse_known_args(self, args=None, namespace=None):
        # parse_known_intermixed_args parses twice through parse_known_args; only the outer call intermixes. A parser
        # with subcommands cannot intermix (its subcommand takes the rest): each subcommand's parser does.
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def whole(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number {within(minimum, maximum)}")
        return value

    return parse


def number(minimum: float, maximum: float, below_maximum: bool = False):
    """An argparse type: a finite number in [minimum, maximum] (or [minimum, maximum) with `below_maximum`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and minimum <= value and (value < maximum if below_maximum else value <= maximum)):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [{minimum:g}, {maximum:g}{')' if below_maximum else ']'}")
        return value

    return parse


def within(minimum: int, maximum: int | None) -> str:
    return f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
