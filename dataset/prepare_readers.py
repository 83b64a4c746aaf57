"""Readers of the official raw files, one per format, and the dataset names that select them.

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
    ``user_id``, ``video_id``, ``time_ms`` and ``is_click``). Several logs may be given, or the
    folder holding them (every ``log_*.csv`` in it, by name). Only rows with ``is_click == 1``
    count as interactions: a video shown but not clicked is an impression, not a choice the user
    made. ``time_ms`` becomes seconds, written exactly (``1649412412946`` -> ``1649412412.946``).
    Output: ``user_id:token  item_id:token  timestamp:float``.
``steam``
    ``steam_reviews.json.gz`` of Kang & McAuley: one Python-literal dict per line (read with
    ``ast.literal_eval``), gzip. The user key is ``username``: it is on every review, while
    ``user_id`` is on only some of them, so keying on ``user_id`` where present would split one
    person's reviews over two ids. ``date`` (``2017-12-17``) becomes Unix seconds at 00:00 UTC.
    Output: ``user_id:token  product_id:token  timestamp:float`` (upstream's Steam config uses
    ``ITEM_ID_FIELD: product_id``).

Each reader yields :data:`prepare_rows.Record` tuples in file order; a malformed file raises
:class:`prepare_rows.PrepareError` naming the file and line.
"""

from __future__ import annotations

import ast
import calendar
import csv
import datetime
import gzip
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from prepare_rows import PrepareError, Record, parse_float, parse_int, rating_text

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


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
            # int() first: the fast path for the plain digits of every real line
            ticks = int(stamp) if stamp.isdigit() else parse_int(stamp, "timestamp")
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
            raise PrepareError(
                f"{path} line {lineno}: {exc} (the ratings CSV has no header)"
            ) from None
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
            ticks = parse_int(str(stamp), "unixReviewTime")
            record = str(user), str(item), ticks, rating_text(str(rating))
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
        raise PrepareError(
            f"{path}: empty file (expected a CSV header naming {', '.join(KUAIRAND_COLUMNS)})"
        )
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
            raise PrepareError(
                f"{path} line {lineno}: {len(record)} fields, the header has {width}"
            )
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
