#!/usr/bin/env python3
"""Build RecBole atomic files for TiM4Rec from the official raw dataset files.

Usage::

    python dataset/prepare.py NAME RAW_PATH [RAW_PATH ...] [--out DIR] [--check]

writes ``DIR/NAME/NAME.inter`` (``DIR`` defaults to the folder holding this script, i.e. the
repository's ``dataset/`` folder, whatever the current directory) and then prints statistics after
the 5-core filter that the project's configs ask RecBole for.

Raw formats
-----------
``ml-1m``
    ``ml-1m.zip`` from grouplens.org, or the ``ratings.dat`` inside it: one
    ``UserID::MovieID::Rating::Timestamp`` line per rating.
    Output: ``user_id:token  item_id:token  rating:float  timestamp:float``.
``amazon-<category>`` (``amazon-beauty``, ``amazon-sports``, ...)
    Either the Amazon 2014 "ratings only" CSV (``user,item,rating,unix_time``, no header; the file
    RecBole's own Amazon atomic files were made from) or the 5-core reviews file
    (``reviews_<Category>_5.json`` or ``.json.gz``: one JSON object per line with ``reviewerID``,
    ``asin``, ``overall`` and ``unixReviewTime``). The format is told from the content.
    Output: the same four columns as ``ml-1m``.
``kuairand``
    KuaiRand-Pure interaction logs (``log_*_pure.csv``: CSV with a header that names at least
    ``user_id``, ``video_id``, ``time_ms`` and ``is_click``). Several logs may be given, or the folder
    holding them (every ``log_*.csv`` in it, by name). Only rows with ``is_click == 1`` count as
    interactions: a video shown but not clicked is an impression, not a choice the user made.
    ``time_ms`` becomes seconds, written exactly (``1649412412946`` -> ``1649412412.946``).
    Output: ``user_id:token  item_id:token  timestamp:float``.
``steam``
    ``steam_reviews.json.gz`` of Kang & McAuley: one Python-literal dict per line (read with
    ``ast.literal_eval``), gzip. The user key is ``username``: it is on every review, while
    ``user_id`` is on only some of them, so keying on ``user_id`` where present would split one
    person's reviews over two ids. ``date`` (``2017-12-17``) becomes Unix seconds at 00:00 UTC.
    Output: ``user_id:token  product_id:token  timestamp:float`` (upstream's Steam config uses
    ``ITEM_ID_FIELD: product_id``).

What the output looks like
--------------------------
* Every interaction is kept, duplicates included: filtering stays RecBole's job
  (``user_inter_num_interval`` / ``item_inter_num_interval``). The only rows left out are those
  with an empty user or item id, which an atomic file cannot hold; their count is printed.
* Rows are ordered by user, then by time, with ties in file order (a stable sort). Users are in
  numeric order when every user id is a decimal integer (ML-1M, KuaiRand) and in code-point order
  otherwise (Amazon reviewer ids, Steam usernames).
* Numbers are written so that they read back exactly: integral values without a decimal point
  (``5``, ``978300760``), others as the shortest decimal that round-trips (``4.5``).
* Ids holding a tab, a line break or a double quote are written in double quotes, the way the
  pandas reader inside RecBole parses them back to the same string.
* The same input always gives the same bytes.

Memory: rows are read as a stream and kept as compact columns (user code, item code, rating code:
4 bytes each; time: 8 bytes) plus one copy of each distinct id, so ML-1M needs a few tens of MB
beyond the interpreter, not a table of Python objects. The file is written under a temporary name
in the output folder and renamed into place only when complete.

Bad input (unknown format, missing column, truncated gzip, empty file, missing path) ends the run
with one line on stderr and exit status 1, leaving any earlier output untouched.
"""

from __future__ import annotations

import argparse
import ast
import calendar
import csv
import datetime
import functools
import gzip
import hashlib
import io
import json
import math
import os
import re
import sys
import zipfile
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NoReturn, Optional, Sequence, Tuple

import numpy as np

DATASET_DIR = Path(__file__).resolve().parent

# RecBole's user_inter_num_interval / item_inter_num_interval "[5,inf)" in the project's configs.
KCORE = 5

# MD5 of ml-1m.zip as published by GroupLens in ml-1m.zip.md5 next to the archive
# (https://files.grouplens.org/datasets/movielens/); the same value is checked by independent
# downloaders of the archive, e.g. PaddlePaddle's dataset cache. GroupLens publishes no checksum for
# the extracted ratings.dat, and no checksums are published for the Amazon 2014, KuaiRand
# (Zenodo lists them only for the .tar.gz archives, not the CSV logs) or Steam files.
OFFICIAL_MD5 = {"ml-1m.zip": "c4d9eecfca2ab87c1945afe126590906"}

# 5-core figures published for the same raw files and the same filter. TiM4Rec's own statistics
# table (arXiv:2409.16182) could not be checked when this was written, so these come from another
# benchmark that reports the same 5-core datasets; none are known for KuaiRand or Steam.
REFERENCE_SOURCE = "OpenP5 benchmark README (Xu, Hua & Zhang, arXiv:2306.11134)"
REFERENCE = {
    "ml-1m": (6040, 3416, 999611),
    "amazon-beauty": (22363, 12101, 198502),
}

# Strings that pandas.read_csv (used by RecBole to load atomic files) turns into NaN by default.
# RecBole then drops the rows whose user or item id is NaN, before the k-core filter.
PANDAS_NA_STRINGS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)

WRITE_CHUNK = 50_000
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


class PrepareError(Exception):
    """A problem with the input or the output, reported as one line without a traceback."""


# One interaction as a reader yields it: user id, item id, time in ticks (1/time_scale seconds),
# rating as written to the atomic file (None where the dataset has no rating).
Record = Tuple[str, str, int, Optional[str]]


# --------------------------------------------------------------------------------------------
# Compact storage of the interactions, in file order
# --------------------------------------------------------------------------------------------


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
        user_codes, item_codes, rating_codes = self.users.codes, self.items.codes, self.ratings.codes
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


# --------------------------------------------------------------------------------------------
# Opening raw files
# --------------------------------------------------------------------------------------------


def require_file(path: Path) -> None:
    if not path.exists():
        raise PrepareError(f"{path}: no such file")
    if not path.is_file():
        raise PrepareError(f"{path}: not a file")


def head_bytes(path: Path, n: int = 4) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def open_text(path: Path) -> io.TextIOBase:
    """Text stream of a plain or gzip file (told apart by its first bytes, not its name)."""
    require_file(path)
    if head_bytes(path, 2) == GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, "r", encoding="utf-8-sig", newline="")


def read_lines(stream: io.TextIOBase, source: str) -> Iterator[tuple[int, str]]:
    """(line number, line) pairs; decoding and decompression faults become PrepareError."""
    try:
        with stream:
            yield from enumerate(stream, start=1)
    except (EOFError, gzip.BadGzipFile, zlib.error, zipfile.BadZipFile) as exc:
        raise PrepareError(f"{source}: truncated or corrupt compressed file ({exc})") from None
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{source}: not UTF-8 text ({exc.reason})") from None


def csv_records(path: Path) -> Iterator[list[str]]:
    """CSV records of a (possibly gzip) file; malformed CSV becomes PrepareError."""
    reader = csv.reader(line for _, line in read_lines(open_text(path), str(path)))
    try:
        yield from reader
    except csv.Error as exc:
        raise PrepareError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None


def first_content_char(path: Path) -> str:
    """First non-blank character of a (possibly gzip) text file, '' when there is none."""
    for _, line in read_lines(open_text(path), str(path)):
        stripped = line.strip()
        if stripped:
            return stripped[0]
    return ""


def short(text: str, limit: int = 60) -> str:
    text = text.rstrip("\r\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --------------------------------------------------------------------------------------------
# Readers, one per raw format
# --------------------------------------------------------------------------------------------


def read_movielens(paths: Sequence[Path]) -> Iterator[Record]:
    path = single_path(paths, "ml-1m")
    stream, source = open_movielens(path)
    for lineno, line in read_lines(stream, source):
        parts = line.rstrip("\r\n").split("::")
        if len(parts) != 4:
            if not line.strip():
                continue
            raise PrepareError(
                f"{source} line {lineno}: expected UserID::MovieID::Rating::Timestamp, "
                f"got {short(line)}"
            )
        user, item, rating, stamp = parts
        try:
            ticks = int(stamp) if stamp.isdigit() else parse_int(stamp, "timestamp")  # fast path first
            record = user, item, ticks, rating_text(rating)
        except ValueError as exc:
            raise PrepareError(f"{source} line {lineno}: {exc}") from None
        yield record


def open_movielens(path: Path) -> tuple[io.TextIOBase, str]:
    """ratings.dat itself, or the ratings.dat member of ml-1m.zip."""
    require_file(path)
    if head_bytes(path) != ZIP_MAGIC:
        return open(path, "r", encoding="utf-8", newline=""), str(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise PrepareError(f"{path}: not a valid zip file ({exc})") from None
    members = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "ratings.dat"]
    if not members:
        raise PrepareError(f"{path}: no ratings.dat inside the zip")
    member = min(members, key=lambda n: (n.count("/"), n))  # ml-1m/ratings.dat, not a nested copy
    raw = archive.open(member)
    return io.TextIOWrapper(raw, encoding="utf-8", newline=""), f"{path}:{member}"


def read_amazon(paths: Sequence[Path]) -> Iterator[Record]:
    path = single_path(paths, "amazon")
    if first_content_char(path) == "{":
        return read_amazon_json(path)
    return read_amazon_csv(path)


def read_amazon_csv(path: Path) -> Iterator[Record]:
    for lineno, record in enumerate(csv_records(path), start=1):
        if not record:
            continue
        if len(record) != 4:
            raise PrepareError(
                f"{path} line {lineno}: expected user,item,rating,unix_time (4 fields, no header), "
                f"got {len(record)} fields"
            )
        user, item, rating, stamp = record
        try:
            record = user, item, parse_int(stamp, "unix_time"), rating_text(rating)
        except ValueError as exc:
            raise PrepareError(f"{path} line {lineno}: {exc} (the ratings CSV has no header)") from None
        yield record


AMAZON_JSON_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")


def read_amazon_json(path: Path) -> Iterator[Record]:
    for lineno, line in read_lines(open_text(path), str(path)):
        if not line.strip():
            continue
        try:
            review = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrepareError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        record = require_keys(review, AMAZON_JSON_FIELDS, f"{path} line {lineno}")
        user, item, rating, stamp = record
        try:
            record = str(user), str(item), parse_int(str(stamp), "unixReviewTime"), rating_text(str(rating))
        except ValueError as exc:
            raise PrepareError(f"{path} line {lineno}: {exc}") from None
        yield record


def require_keys(record: object, keys: Sequence[str], where: str) -> list[object]:
    if not isinstance(record, dict):
        raise PrepareError(f"{where}: expected an object with {', '.join(keys)}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise PrepareError(f"{where}: missing field {', '.join(missing)}")
    return [record[k] for k in keys]


KUAIRAND_COLUMNS = ("user_id", "video_id", "time_ms", "is_click")


def kuairand_logs(paths: Sequence[Path]) -> list[Path]:
    """The given log files in order; a folder stands for its log_*.csv files sorted by name."""
    logs: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("log_*.csv"))
            if not found:
                raise PrepareError(f"{path}: no log_*.csv files in this folder")
            logs.extend(found)
        else:
            logs.append(path)
    return logs


def read_kuairand(paths: Sequence[Path]) -> Iterator[Record]:
    for path in kuairand_logs(paths):
        yield from read_kuairand_log(path)


def read_kuairand_log(path: Path) -> Iterator[Record]:
    records = csv_records(path)
    header = next(records, None)
    if header is None:
        raise PrepareError(f"{path}: empty file (expected a CSV header naming {', '.join(KUAIRAND_COLUMNS)})")
    header = [name.strip() for name in header]
    missing = [c for c in KUAIRAND_COLUMNS if c not in header]
    if missing:
        raise PrepareError(f"{path}: missing column {', '.join(missing)} in the CSV header")
    u_at, v_at, t_at, c_at = (header.index(c) for c in KUAIRAND_COLUMNS)
    width = len(header)
    for lineno, record in enumerate(records, start=2):
        if not record:
            continue
        if len(record) != width:
            raise PrepareError(f"{path} line {lineno}: {len(record)} fields, the header has {width}")
        try:
            if parse_float(record[c_at], "is_click") != 1:
                continue
            ticks = parse_int(record[t_at], "time_ms")
        except ValueError as exc:
            raise PrepareError(f"{path} line {lineno}: {exc}") from None
        yield record[u_at], record[v_at], ticks, None


STEAM_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def read_steam(paths: Sequence[Path]) -> Iterator[Record]:
    path = single_path(paths, "steam")
    for lineno, line in read_lines(open_text(path), str(path)):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            review = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise PrepareError(f"{where}: not a Python dict literal, got {short(line)}") from None
        user, item, date = require_keys(review, ("username", "product_id", "date"), where)
        yield str(user), str(item), steam_seconds(date, where), None


def steam_seconds(date: object, where: str) -> int:
    """'2017-12-17' -> Unix seconds of that day's 00:00 UTC."""
    if not isinstance(date, str) or not STEAM_DATE.fullmatch(date):
        raise PrepareError(f"{where}: date {date!r} is not YYYY-MM-DD")
    try:
        day = datetime.date.fromisoformat(date)
    except ValueError as exc:
        raise PrepareError(f"{where}: date {date!r}: {exc}") from None
    return calendar.timegm(day.timetuple())


def single_path(paths: Sequence[Path], name: str) -> Path:
    if len(paths) != 1:
        raise PrepareError(f"{name} takes one raw file, got {len(paths)}")
    return paths[0]


# --------------------------------------------------------------------------------------------
# Dataset kinds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    reader: Callable[[Sequence[Path]], Iterator[Record]]
    fields: tuple[str, ...]  # atomic-file header, in column order
    time_scale: int = 1  # ticks per second in the raw file

    @property
    def has_rating(self) -> bool:
        return "rating:float" in self.fields


RATED = ("user_id:token", "item_id:token", "rating:float", "timestamp:float")
KINDS = {
    "ml-1m": Kind(read_movielens, RATED),
    "amazon": Kind(read_amazon, RATED),
    "kuairand": Kind(read_kuairand, ("user_id:token", "item_id:token", "timestamp:float"), 1000),
    "steam": Kind(read_steam, ("user_id:token", "product_id:token", "timestamp:float")),
}
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def kind_of(name: str) -> Kind:
    if name in KINDS and name != "amazon":
        return KINDS[name]
    if name.startswith("amazon-") and NAME_PATTERN.fullmatch(name):
        return KINDS["amazon"]
    raise PrepareError(
        f"unknown dataset {name!r}: choose ml-1m, amazon-<category> (e.g. amazon-beauty), "
        "kuairand or steam"
    )


# --------------------------------------------------------------------------------------------
# Ordering and writing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    users: int
    items: int
    interactions: int

    @property
    def avg_length(self) -> float:
        return self.interactions / self.users if self.users else 0.0

    @property
    def sparsity(self) -> float:
        cells = self.users * self.items
        return 1.0 - self.interactions / cells if cells else 0.0


def stats_of(users: np.ndarray, items: np.ndarray, keep: np.ndarray) -> Stats:
    return Stats(
        users=int(np.unique(users[keep]).size),
        items=int(np.unique(items[keep]).size),
        interactions=int(keep.sum()),
    )


def kcore_mask(users: np.ndarray, items: np.ndarray, keep: np.ndarray, k: int = KCORE) -> np.ndarray:
    """Rows left by RecBole's _filter_by_inter_num with both intervals "[k,inf)".

    Like RecBole, each round bans every user and every item that has fewer than k of the remaining
    interactions, drops all their interactions at once, and repeats until nothing is banned.
    Duplicate user-item pairs count separately, as they do in RecBole without rm_dup_inter.
    """
    keep = keep.copy()
    n_users, n_items = int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1
    while True:
        user_count = np.bincount(users[keep], minlength=n_users)
        item_count = np.bincount(items[keep], minlength=n_items)
        ban_user = (user_count > 0) & (user_count < k)
        ban_item = (item_count > 0) & (item_count < k)
        if not ban_user.any() and not ban_item.any():
            return keep
        keep &= ~(ban_user[users] | ban_item[items])


def recbole_loaded(rows: Interactions) -> np.ndarray:
    """Rows RecBole keeps on loading: those whose ids pandas does not read as missing."""
    na_user = np.array([t in PANDAS_NA_STRINGS for t in rows.users.tokens()], dtype=bool)
    na_item = np.array([t in PANDAS_NA_STRINGS for t in rows.items.tokens()], dtype=bool)
    return ~(na_user[rows.column("user_col")] | na_item[rows.column("item_col")])


def dataset_stats(rows: Interactions) -> tuple[Stats, Stats, int]:
    """(all rows, after RecBole's 5-core filter, rows RecBole reads as missing ids)."""
    users, items = rows.column("user_col"), rows.column("item_col")
    everything = np.ones(len(rows), dtype=bool)
    loaded = recbole_loaded(rows)
    kept = kcore_mask(users, items, loaded)
    return stats_of(users, items, everything), stats_of(users, items, kept), int((~loaded).sum())


def stats_table(name: str, raw: Stats, core: Stats) -> str:
    ref = REFERENCE.get(name)
    ref_stats = Stats(*ref) if ref else None
    head = ["", "all rows", f"{KCORE}-core"] + (["published", ""] if ref_stats else [])
    lines = [head]
    for label, get, fmt in (
        ("users", lambda s: s.users, "{:,}"),
        ("items", lambda s: s.items, "{:,}"),
        ("interactions", lambda s: s.interactions, "{:,}"),
        ("avg. sequence length", lambda s: s.avg_length, "{:,.2f}"),
        ("sparsity", lambda s: s.sparsity * 100, "{:.2f}%"),
    ):
        row = [label, fmt.format(get(raw)), fmt.format(get(core))]
        if ref_stats:
            ours, theirs = fmt.format(get(core)), fmt.format(get(ref_stats))
            row += [theirs, "match" if ours == theirs else "DIFFERS"]
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
        for r in lines
    ]
    return "\n".join(text)


def report(name: str, rows: Interactions, out_path: Path) -> None:
    raw, core, na_rows = dataset_stats(rows)
    print(f"wrote {out_path} ({raw.interactions:,} rows, {raw.users:,} users, {raw.items:,} items)")
    if rows.skipped:
        print(f"left out {rows.skipped:,} rows with an empty user or item id")
    if na_rows:
        print(
            f"note: {na_rows:,} rows have an id that RecBole's loader reads as missing "
            "(e.g. 'NA', 'null'); RecBole drops them, and so do the statistics below"
        )
    print()
    print(
        f"Statistics after RecBole's iterative filter user_inter_num_interval = "
        f'item_inter_num_interval = "[{KCORE},inf)" (counts exclude padding):'
    )
    print(stats_table(name, raw, core))
    if name in REFERENCE:
        print(f"published: {REFERENCE_SOURCE}; TiM4Rec's own table could not be checked.")
    else:
        print(f"published: no {KCORE}-core figures known for {name}; TiM4Rec's own table could not be checked.")


# --------------------------------------------------------------------------------------------
# Checksums and the command line
# --------------------------------------------------------------------------------------------


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_md5(name: str, paths: Sequence[Path]) -> None:
    """Compare the raw file with the official checksum where one is published."""
    if name != "ml-1m":
        print(f"check: no official checksum is published for the {name} raw files; not checked")
        return
    path = single_path(paths, name)
    require_file(path)
    if head_bytes(path) != ZIP_MAGIC:
        print("check: GroupLens publishes a checksum for ml-1m.zip only; pass the zip to verify it")
        return
    expected, actual = OFFICIAL_MD5["ml-1m.zip"], md5_of(path)
    if actual != expected:
        raise PrepareError(f"{path}: md5 {actual} differs from the official ml-1m.zip md5 {expected}")
    print(f"check: {path} md5 {actual} matches the official ml-1m.zip")


def prepare(name: str, paths: Sequence[Path], out_dir: Path, check: bool = False) -> Path:
    """Convert, write and report; returns the path of the atomic file."""
    kind = kind_of(name)
    if check:
        check_md5(name, paths)
    rows = Interactions(kind.time_scale)
    rows.extend(kind.reader(paths))
    if len(rows) == 0:
        raise PrepareError(f"{', '.join(map(str, paths))}: no interactions found (empty file?)")
    out_path = out_dir / name / f"{name}.inter"
    write_inter(out_path, rows, kind, row_order(rows))
    report(name, rows, out_path)
    return out_path


class OneLineParser(argparse.ArgumentParser):
    """Usage errors on one line too, like every other error of this script."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="prepare.py",
        description=(
            "Build the RecBole atomic file NAME/NAME.inter from an official raw dataset file,\n"
            "then print its statistics after RecBole's 5-core filter."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
datasets and raw files:
  ml-1m             ml-1m.zip (grouplens.org) or its ratings.dat
  amazon-<category> Amazon 2014 ratings-only CSV (user,item,rating,unix_time) or the
                    5-core reviews_<Category>_5.json[.gz]; e.g. amazon-beauty
  kuairand          KuaiRand-Pure log_*_pure.csv files, or the folder holding them;
                    only rows with is_click == 1 count as interactions; time_ms -> seconds
  steam             steam_reviews.json.gz (Kang & McAuley); user = username (always
                    present, unlike user_id); date -> Unix seconds at 00:00 UTC

Every row is kept (filtering is left to RecBole's user/item_inter_num_interval). Rows
are sorted by user (numerically when all user ids are integers), then by time, ties
in file order. The same input gives byte-identical output.

examples:
  python dataset/prepare.py ml-1m ~/Downloads/ml-1m.zip --check
  python dataset/prepare.py amazon-beauty ~/Downloads/ratings_Beauty.csv
  python dataset/prepare.py kuairand ~/Downloads/KuaiRand-Pure/data
  python dataset/prepare.py steam ~/Downloads/steam_reviews.json.gz
""",
    )
    parser.add_argument("name", metavar="NAME", help="ml-1m, amazon-<category>, kuairand or steam")
    parser.add_argument("raw", metavar="RAW_PATH", nargs="+", type=Path, help="the official raw file(s)")
    parser.add_argument(
        "--out", type=Path, default=DATASET_DIR, metavar="DIR",
        help=f"folder that receives NAME/NAME.inter (default: this script's folder, {DATASET_DIR})",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="first verify the raw file's md5 against the official one (published for ml-1m.zip only)",
    )
    return parser


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args.name, args.raw, args.out, check=args.check)
    except PrepareError as exc:
        print(f"prepare.py: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"prepare.py: error: {where}{one_line(exc.strerror or exc)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("prepare.py: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
