#!/usr/bin/env python3
"""Build RecBole atomic files for TiM4Rec from the official raw dataset files.

Usage::

    python dataset/prepare.py NAME RAW_PATH [RAW_PATH ...] [--out DIR] [--check]

writes ``DIR/NAME/NAME.inter`` (``DIR`` defaults to the folder holding this script, i.e. the
repository's ``dataset/`` folder, whatever the current directory) and then prints statistics after
the 5-core filter that the project's configs ask RecBole for.

Dataset names and the raw files they take: ``ml-1m`` (``ml-1m.zip`` or its ``ratings.dat``),
``amazon-<category>`` (the Amazon 2014 ratings CSV or 5-core reviews JSON), ``kuairand``
(KuaiRand-Pure logs, or their folder) and ``steam`` (``steam_reviews.json.gz``); each format is
described in ``prepare_readers.py`` and in ``--help``.

The work is split by what changes it: ``prepare_readers.py`` reads the raw formats,
``prepare_rows.py`` holds the rows in memory, ``prepare_writer.py`` writes the atomic file and
``prepare_stats.py`` computes and prints the statistics; this file is the command line.

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
import hashlib
import sys
from pathlib import Path
from typing import NoReturn, Sequence

# Its sibling modules, also where Python puts no script folder on the path (-P, PYTHONSAFEPATH).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_readers import ZIP_MAGIC, head_bytes, kind_of, require_file, single_path  # noqa: E402
from prepare_rows import Interactions, PrepareError  # noqa: E402
from prepare_stats import report  # noqa: E402
from prepare_writer import row_order, write_inter  # noqa: E402

DATASET_DIR = Path(__file__).resolve().parent

# MD5 of ml-1m.zip as published by GroupLens in ml-1m.zip.md5 next to the archive
# (https://files.grouplens.org/datasets/movielens/); the same value is checked by independent
# downloaders of the archive, e.g. PaddlePaddle's dataset cache. GroupLens publishes no checksum for
# the extracted ratings.dat, and no checksums are published for the Amazon 2014, KuaiRand
# (Zenodo lists them only for the .tar.gz archives, not the CSV logs) or Steam files.
OFFICIAL_MD5 = {"ml-1m.zip": "c4d9eecfca2ab87c1945afe126590906"}


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
        raise PrepareError(
            f"{path}: md5 {actual} differs from the official ml-1m.zip md5 {expected}"
        )
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
    parser.add_argument(
        "raw", metavar="RAW_PATH", nargs="+", type=Path, help="the official raw file(s)"
    )
    parser.add_argument(
        "--out", type=Path, default=DATASET_DIR, metavar="DIR",
        help=f"folder that receives NAME/NAME.inter (default: this script's folder, {DATASET_DIR})",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="first verify the raw file's md5 against the official one "
        "(published for ml-1m.zip only)",
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
