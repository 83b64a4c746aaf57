"""The interactions of one dataset in memory, and the text of their values.

Readers yield :data:`Record` tuples; :class:`Interactions` keeps them as compact columns (a 4-byte
code per user, item and rating, 8 bytes per time) plus one copy of each distinct id, so a dataset
of millions of rows never becomes a table of Python objects. The value helpers parse raw fields
and format numbers so that they read back exactly.
"""

from __future__ import annotations

import functools
import math
from array import array
from typing import Iterable, Optional, Tuple

import numpy as np


class PrepareError(Exception):
    """A problem with the input or the output, reported as one line without a traceback."""


# One interaction as a reader yields it: user id, item id, time in ticks (1/time_scale seconds),
# rating as written to the atomic file (None where the dataset has no rating).
Record = Tuple[str, str, int, Optional[str]]


class Vocab:
    """Gives each distinct string a small integer code, in order of first appearance."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def tokens(self) -> list[str]:
        return list(self.codes)  # dicts keep insertion order, which is code order

    def __len__(self) -> int:
        return len(self.codes)


class Interactions:
    """Rows stored as columns of machine integers rather than Python objects."""

    def __init__(self, time_scale: int) -> None:
        self.time_scale = time_scale  # ticks per second of self.ticks
        self.users, self.items, self.ratings = Vocab(), Vocab(), Vocab()
        self.user_col, self.item_col, self.rating_col = array("i"), array("i"), array("i")
        self.ticks = array("q")
        self.skipped = 0  # rows with an empty user or item id

    def extend(self, records: Iterable[Record]) -> None:
        """Append records in order. This loop runs once per row, hence the local names."""
        user_codes, item_codes = self.users.codes, self.items.codes
        rating_codes = self.ratings.codes
        add_user, add_item = self.user_col.append, self.item_col.append
        add_ticks, add_rating = self.ticks.append, self.rating_col.append
        for user, item, ticks, rating in records:
            if not user or not item:
                self.skipped += 1
                continue
            code = user_codes.get(user)
            if code is None:
                code = user_codes[user] = len(user_codes)
            add_user(code)
            code = item_codes.get(item)
            if code is None:
                code = item_codes[item] = len(item_codes)
            add_item(code)
            add_ticks(ticks)
            if rating is not None:
                code = rating_codes.get(rating)
                if code is None:
                    code = rating_codes[rating] = len(rating_codes)
                add_rating(code)

    def __len__(self) -> int:
        return len(self.user_col)

    def column(self, name: str) -> np.ndarray:
        """A zero-copy numpy view of one column."""
        dtype = np.int64 if name == "ticks" else np.int32
        return np.frombuffer(getattr(self, name), dtype=dtype)


def format_number(text: str | float) -> str:
    """Exact text for a float: integral values without '.0', others as the shortest round-trip."""
    value = parse_float(str(text), "rating")
    if not math.isfinite(value):
        raise ValueError(f"rating {text!r} is not a finite number")
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


@functools.lru_cache(maxsize=4096)
def rating_text(raw: str) -> str:
    """format_number for ratings: few distinct rating strings exist, so each is parsed once."""
    return format_number(raw)


def format_ticks(ticks: int, scale: int) -> str:
    """Seconds as an exact decimal string, from an integer count of 1/scale seconds."""
    if scale == 1:
        return str(ticks)
    sign = "-" if ticks < 0 else ""
    whole, frac = divmod(abs(ticks), scale)
    if frac == 0:
        return f"{sign}{whole}"
    digits = len(str(scale)) - 1
    return f"{sign}{whole}.{frac:0{digits}d}".rstrip("0")


def parse_int(text: str, what: str) -> int:
    """An integer field; '1.0'-style integral floats (some CSV writers emit them) are accepted."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise ValueError(f"{what} {text!r} is not an integer")
    return int(value)


def parse_float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
