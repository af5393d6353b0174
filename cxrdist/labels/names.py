"""Label names as a user types them: a list of non-empty strings, no finding under two spellings.

"Effusion" and "effusion ", or "Pleural Effusion" and "Pleural_Effusion", are one finding to a reader and two
labels to the model: each would train on half the annotations and be scored apart, without a word. Names that
are equal once case, spaces, underscores and hyphens are set aside are refused wherever a label list is made
(`prepare --labels`, `data.vocabulary`, the harmonised vocabulary of several datasets).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cxrdist.errors import UserError

SEPARATORS = re.compile(r"[\s_\-]+")


def spelling_key(name: str) -> str:
    """What two spellings of one name share: case, spaces, underscores and hyphens set aside."""
    return SEPARATORS.sub(" ", name).strip().casefold()


def near_duplicate(names: Sequence[str]) -> tuple[str, str] | None:
    """The first two different names that are one name spelled two ways, or None."""
    seen: dict[str, str] = {}
    for name in names:
        key = spelling_key(name)
        if key in seen and seen[key] != name:
            return seen[key], name
        seen.setdefault(key, name)
    return None


def check_spellings(names: Sequence[str], where: str) -> None:
    pair = near_duplicate(names)
    if pair is not None:
        raise UserError(f"{where}: labels {pair[0]!r} and {pair[1]!r} differ only in case, spaces or underscores: one finding under "
                        "two names would be two labels, each with part of the annotations; spell them alike")


def label_list(value, where: str) -> list[str]:
    """A list of label names from a config value: a list (not a string, a mapping or a number) of non-empty strings,
    none twice, no two spellings of one name."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise UserError(f"{where}: expected a list of label names, e.g. [Cardiomegaly, Edema], got {value!r}")
    bad = [item for item in value if not isinstance(item, str) or not item.strip()]
    if bad:
        raise UserError(f"{where}: {bad[0]!r} is not a label name (names are non-empty text)")
    if not value:
        raise UserError(f"{where}: an empty list names no label (leave it out, or null, for the datasets' own labels)")
    twice = sorted({name for name in value if list(value).count(name) > 1})
    if twice:
        raise UserError(f"{where}: label names given twice: {', '.join(twice)}")
    check_spellings(value, where)
    return list(value)
