"""The atomic file: rows ordered by user then time, written under a temporary name and renamed.

Numbers are written so that they read back exactly; ids holding a tab, a line break or a double
quote are quoted the way the pandas reader inside RecBole parses them back. The same rows always
give the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from prepare_readers import Kind
from prepare_rows import Interactions, Vocab, format_ticks

WRITE_CHUNK = 50_000


def user_ranks(tokens: list[str]) -> np.ndarray:
    """Rank of each user code: numeric order if every id is a decimal integer, else code points."""
    if all(t.isascii() and t.isdigit() for t in tokens):
        key: Callable[[int], object] = lambda c: (int(tokens[c]), tokens[c])
    else:
        key = lambda c: tokens[c]
    ranks = np.empty(len(tokens), dtype=np.int64)
    ranks[sorted(range(len(tokens)), key=key)] = np.arange(len(tokens))
    return ranks


def row_order(rows: Interactions) -> np.ndarray:
    """Row indices by user, then time; the sorts are stable, so ties keep file order."""
    ticks = rows.column("ticks")
    ranks = user_ranks(rows.users.tokens())[rows.column("user_col")]
    low, high = int(ticks.min()), int(ticks.max())
    span = high - low + 1
    if (len(rows.users) - 1) * span + max(high, 0) < 2**63:
        # One sort on rank * span + (ticks - low): the same order as sorting by (user, time), with
        # half the temporary arrays of two passes.
        ranks *= span
        ranks += ticks
        ranks -= low
        return np.argsort(ranks, kind="stable")
    by_time = np.argsort(ticks, kind="stable")
    return by_time[np.argsort(ranks[by_time], kind="stable")]


def atomic_token(token: str) -> str:
    """A token as pandas.read_csv (RecBole's loader) reads it back unchanged from a TSV cell."""
    if any(c in token for c in '\t\n\r"'):
        return '"' + token.replace('"', '""') + '"'
    return token


def token_table(vocab: Vocab) -> np.ndarray:
    return np.array([atomic_token(t) for t in vocab.tokens()], dtype=object)


def write_inter(path: Path, rows: Interactions, kind: Kind, order: np.ndarray) -> None:
    """Write the atomic file under a temporary name, then rename it into place."""
    created_dir = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="\n") as out:
            out.write("\t".join(kind.fields) + "\n")
            for chunk in inter_lines(rows, kind, order):
                out.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created_dir:
            try_rmdir(path.parent)
        raise


def inter_lines(rows: Interactions, kind: Kind, order: np.ndarray) -> Iterator[str]:
    users, items = token_table(rows.users), token_table(rows.items)
    ratings = np.array(rows.ratings.tokens(), dtype=object)
    user_col, item_col = rows.column("user_col"), rows.column("item_col")
    ticks = rows.column("ticks")
    rating_col = rows.column("rating_col") if kind.has_rating else None
    for start in range(0, len(order), WRITE_CHUNK):
        idx = order[start:start + WRITE_CHUNK]
        columns = [users[user_col[idx]].tolist(), items[item_col[idx]].tolist()]
        if rating_col is not None:
            columns.append(ratings[rating_col[idx]].tolist())
        if rows.time_scale == 1:
            columns.append(list(map(str, ticks[idx].tolist())))
        else:
            columns.append([format_ticks(t, rows.time_scale) for t in ticks[idx].tolist()])
        yield "".join(line + "\n" for line in map("\t".join, zip(*columns)))


def try_rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
