"""RecBole's interaction file (``NAME.inter``), read with every row checked.

RecBole reads atomic files with pandas and mends what it meets on its own, or fails deep inside:
empty or NaN values of a float column are filled with the column's mean (TiM4Rec would read a
made-up time), a non-numeric value, a header without types or a line over 128 KB end in a
traceback, and a comma-separated file reads as one column. :func:`read_interactions` takes the place
of RecBole's reading of the interaction file (:mod:`pipeline.compat` installs it) and says what it
finds in one line:

- the header: ``name:type`` columns (token, float, token_seq, float_seq) split by
  ``field_separator``; another separator that would split it is named;
- every row of the loaded columns: a missing value (an empty field, a short line, NaN, inf) or a
  non-numeric value in a float column is an error naming the line; with ``invalid_rows: drop`` such
  rows are left out, with a warning and their count;
- a user or item token that pandas reads as missing (``NA``, ``null``, ``None``, ...; Steam has
  such usernames): RecBole, and so the authors' runs, leave those rows out; so does this, with a
  warning and their count;
- rows repeating a (user, item, time) row: a warning with their count; with
  ``duplicate_rows: drop`` the repeats are left out;
- a line over 128 KB (a file with other line endings, or not an atomic file), a file with no rows,
  and a file whose rows the filters all remove (with the counts before): errors.

The values kept are those RecBole would read: float columns as float64, tokens as strings (other
token columns than the user's and the item's with such a token become missing, as in RecBole). A
file whose loaded columns include a sequence type is left to RecBole's own reader.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES  # what pandas, and so RecBole, reads as missing

from pipeline.errors import UserError

TYPES = ("token", "float", "token_seq", "float_seq")
MAX_FIELD_CHARS = 128 * 1024  # RecBole's reader (Python's csv module) stops at 128 KB a field
_OTHER_SEPARATORS = {",": "commas", ";": "semicolons", "|": "bars", " ": "spaces", "\t": "tabs"}

logger = logging.getLogger(__name__)


def read_header(path, separator: str = "\t", encoding=None) -> list[tuple[str, str]]:
    """The file's columns as (name, type); UserError for an empty file or a malformed header."""
    with open(path, encoding=encoding or "utf-8", newline="") as f:
        line = f.readline(MAX_FIELD_CHARS + 1)
    line = line.rstrip("\r\n")
    if not line:
        raise UserError(f"{path} is empty: an atomic file starts with a header line "
                        f"such as user_id:token<TAB>item_id:token<TAB>timestamp:float")
    if len(line) > MAX_FIELD_CHARS:
        raise UserError(f"{path}: the header line is over 128 KB: not an atomic file "
                        f"(or its lines do not end in newlines)")
    fields = line.split(separator)
    if len(fields) == 1:
        for other, name in _OTHER_SEPARATORS.items():
            if other != separator and len(line.split(other)) > 1 and ":" in line:
                raise UserError(f"{path}: the header is separated by {name}, not by "
                                f"field_separator {separator!r}: convert the file, or set "
                                f"field_separator: {other!r}")
    columns = []
    for field in fields:
        name, colon, kind = field.partition(":")
        if not colon:
            raise UserError(f"{path}: header column '{field}' has no type: atomic files "
                            f"name each column as name:type ({', '.join(TYPES)}), e.g. "
                            f"user_id:token")
        if kind not in TYPES:
            raise UserError(f"{path}: header column '{field}' has type '{kind}'; the "
                            f"types are {', '.join(TYPES)}")
        columns.append((name, kind))
    return columns


def read_interactions(dataset, path, source, recbole_reader):
    """RecBole's ``Dataset._load_feat`` for the interaction file, with the checks above;
    ``recbole_reader`` reads files this does not (sequence columns, separators of several
    characters). Records the counts before filtering on the dataset for :func:`check_not_empty`."""
    config = dataset.config
    separator = config["field_separator"]
    columns = read_header(path, separator, config["encoding"])
    load_col, unload_col = dataset._get_load_and_unload_col(source)
    if load_col == set():
        return None
    chosen = [(i, name, kind) for i, (name, kind) in enumerate(columns)
              if (load_col is None or name in load_col)
              and (unload_col is None or name not in unload_col)]
    if not chosen or len(separator) != 1 or any(kind.endswith("seq") for _, _, kind in chosen):
        return recbole_reader(path, source)
    frame = _read_strings(path, separator, config["encoding"], [i for i, _, _ in chosen])
    frame.columns = [name for _, name, _ in chosen]
    frame = _checked_rows(frame, {name: kind for _, name, kind in chosen}, dataset, path)
    for name, kind in ((name, kind) for _, name, kind in chosen):
        dataset.field2source[name] = source
        dataset.field2type[name] = _feature_type(kind)
        dataset.field2seqlen[name] = 1
        if kind == "float":
            dataset.field2bucketnum[name] = 2  # as RecBole's reader sets it
    dataset._rows_read = _counts(frame, dataset)
    return frame


def _feature_type(kind: str):
    from recbole.utils import FeatureType

    return FeatureType(kind)


def _read_strings(path, separator: str, encoding, usecols: list[int]) -> pd.DataFrame:
    """The columns ``usecols`` of every row, as strings. Every column is read (and the others
    dropped), so that the parser checks each row's count of fields against the header's."""
    try:
        frame = pd.read_csv(path, sep=separator, header=0, dtype=str, engine="c",
                            keep_default_na=False, na_filter=False, skip_blank_lines=False,
                            encoding=encoding or "utf-8")
    except pd.errors.ParserError as error:  # e.g. "Expected 3 fields in line 7, saw 4"
        detail = str(error).split("C error: ")[-1].strip()
        raise UserError(f"{path}: {detail}") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not text in encoding {encoding or 'utf-8'} "
                        f"({error.reason} at byte {error.start})") from None
    return frame.iloc[:, usecols]


def _line(index) -> int:
    return int(index) + 2  # the header is line 1; blank lines are kept as rows


def _checked_rows(frame: pd.DataFrame, kinds: dict, dataset, path) -> pd.DataFrame:
    config = dataset.config
    if frame.empty:
        raise UserError(f"{path} has a header and no rows")
    too_long = np.zeros(len(frame), dtype=bool)
    for name in frame.columns:
        too_long |= frame[name].str.len().to_numpy() > MAX_FIELD_CHARS
    if too_long.any():
        first = np.flatnonzero(too_long)[0]
        raise UserError(f"{path}: line {_line(first)} is over 128 KB: not an atomic file "
                        f"line (are the file's line endings right?)")
    bad = np.zeros(len(frame), dtype=bool)
    first_reason = None
    for name, kind in kinds.items():
        values = frame[name]
        if kind == "float":
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
            wrong = ~np.isfinite(numbers)
        else:
            wrong = (values.str.strip() == "").to_numpy()
        if wrong.any():
            row = np.flatnonzero(wrong)[0]
            if first_reason is None or row < first_reason[0]:
                value = values.iloc[row]
                what = (f"no value for {name}" if value.strip() == "" else
                        f"a {kind} column {name} that is not a number: {value[:40]!r}")
                first_reason = (row, what)
            bad |= wrong
        if kind == "float":
            frame[name] = numbers
    if bad.any():
        row, what = first_reason
        count = int(bad.sum())
        if config["invalid_rows"] != "drop":
            raise UserError(f"{path}: line {_line(row)} has {what} ({count} such "
                            f"row{'s' if count > 1 else ''}; invalid_rows: drop leaves them out)")
        logger.warning(f"{path}: left out {count} rows with a missing or non-numeric value "
                       f"(invalid_rows: drop; the first: line {_line(row)}, {what})")
        frame = frame[~bad]
    frame = _without_missing_tokens(frame, kinds, dataset, path)
    return _without_duplicates(frame, dataset, path)


def _without_missing_tokens(frame: pd.DataFrame, kinds: dict, dataset, path) -> pd.DataFrame:
    """Tokens that pandas reads as missing, as RecBole treats them: rows with such a user or item
    are left out (reported), other token columns hold a missing value there."""
    config = dataset.config
    ids = (config["USER_ID_FIELD"], config["ITEM_ID_FIELD"])
    missing = set(STR_NA_VALUES) - {""}
    dropped = np.zeros(len(frame), dtype=bool)
    for name, kind in kinds.items():
        if kind != "token":
            continue
        where = frame[name].isin(missing).to_numpy()
        if not where.any():
            continue
        if name in ids:
            first = np.flatnonzero(where & ~dropped)
            if len(first):
                row = first[0]
                logger.warning(f"{path}: left out {int((where & ~dropped).sum())} rows whose "
                               f"{name} is a token that pandas reads as missing, as RecBole does "
                               f"(the first: line {_line(frame.index[row])}, "
                               f"{frame[name].iloc[row]!r})")
            dropped |= where
        else:
            frame[name] = frame[name].mask(where)
    return frame[~dropped] if dropped.any() else frame


def _without_duplicates(frame: pd.DataFrame, dataset, path) -> pd.DataFrame:
    config = dataset.config
    key = [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]]
    if not set(key) <= set(frame.columns):
        return frame  # without a time column a repeated (user, item) is a repeated interaction
    repeats = frame.duplicated(subset=key).to_numpy()
    count = int(repeats.sum())
    if not count:
        return frame
    first = _line(frame.index[np.flatnonzero(repeats)[0]])
    if config["duplicate_rows"] == "drop":
        logger.warning(f"{path}: left out {count} rows repeating an earlier (user, item, time) "
                       f"row (duplicate_rows: drop; the first: line {first})")
        return frame[~repeats]
    logger.warning(f"{path}: {count} of {len(frame)} rows repeat an earlier (user, item, time) "
                   f"row (the first: line {first}); a repeated last interaction makes the "
                   f"held-out item also the last input. duplicate_rows: drop leaves them out")
    return frame


def _counts(frame: pd.DataFrame, dataset) -> tuple[int, int, int]:
    config = dataset.config
    users = frame[config["USER_ID_FIELD"]].nunique() if config["USER_ID_FIELD"] in frame else 0
    items = frame[config["ITEM_ID_FIELD"]].nunique() if config["ITEM_ID_FIELD"] in frame else 0
    return len(frame), users, items


def check_not_empty(dataset) -> None:
    """UserError when the filters left no interaction, with the counts before and the filters."""
    if dataset.inter_feat is not None and len(dataset.inter_feat) > 0:
        return
    config = dataset.config
    rows, users, items = getattr(dataset, "_rows_read", (None, None, None))
    before = f" (before them: {rows} rows, {users} users, {items} items)" if rows else ""
    filters = ", ".join(f"{key} {config[key]}" for key in
                        ("user_inter_num_interval", "item_inter_num_interval", "val_interval")
                        if config[key])
    raise UserError(f"dataset '{config['dataset']}': the filters left no interactions{before}; "
                    f"filters: {filters or 'none'}")
