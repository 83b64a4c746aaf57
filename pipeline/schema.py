"""What each setting accepts, read from the comments of the YAML files that document it.

Every key of this project's YAML files carries a RecBole-style comment::

    learning_rate: 0.001            # (float) Learning rate. Range: > 0.
    dropout_prob: 0.2               # (float) Dropout of embeddings ... Range: [0, 1).
    ssd_backend: auto               # (str) SSD scan: ... Range: auto, triton, torch.
    train_neg_sample_args: ~        # (dict or None) No negative sampling ...

The type in parentheses and the ``Range:`` clause are the contract of the setting, and this module
holds every run to them before anything is loaded, so the file that documents a setting also
decides what it accepts. Types: int, float (an int is accepted), bool, str, list, dict, several
joined by ``or`` (``(str or bool)``); ``or None``, or a documented default of ``~``, also accepts
None. Ranges: ``>= a``, ``> a``, ``<= a``, ``< a``, intervals ``[a, b)`` (any brackets), or a
list of choices (``'CE', 'BPR'`` or ``auto, True, False``). A range naming other settings
(``(0, r_max)``, ``a multiple of n_heads``, ``a power of two``) is left to the model, which
checks it when it is built.

:func:`unknown_key` tells whether a key is a setting at all, with the nearest known key as a hint.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_KEY_LINE = re.compile(r"^(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*)#\s*"
                       r"\((?P<types>[a-z]+(?: or [A-Za-z]+)*)\)(?P<text>.*)$")
_COMPARISON = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$")
_CHOICE = re.compile(r"^'[^']*'$|^[A-Za-z_]\w*$")
TYPES = ("int", "float", "bool", "str", "list", "dict")


@dataclass(frozen=True)
class Setting:
    """One documented setting: the types it takes (``None`` among them where empty is allowed) and
    its range (or None)."""

    key: str
    types: tuple[str, ...]
    range: str | None
    source: Path

    def problem(self, value) -> str | None:
        """Why ``value`` is not accepted (``"must be ..."``), or None when it is."""
        if value is None:
            return None if "None" in self.types else f"must be {self._words()}, not empty"
        if not any(_has_type(value, kind) for kind in self.types if kind != "None"):
            return f"must be {self._words()}"
        return _out_of_range(value, self.range) if self.range else None

    def _words(self) -> str:
        return " or ".join(_TYPE_WORDS[kind] for kind in self.types if kind != "None")


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
               "list": "a list", "dict": "a dict"}


def _has_type(value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # a bool is an int to Python, never to a setting
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, {"str": str, "list": (list, tuple), "dict": dict}[kind])


def _out_of_range(value, spec: str) -> str | None:
    """The range's complaint about ``value``, or None (also for ranges this module cannot read)."""
    first = spec.split(",")[0].strip()
    if match := _COMPARISON.match(first):
        op, bound = match.group(1), float(match.group(2))
        ok = {">=": value >= bound, ">": value > bound, "<=": value <= bound,
              "<": value < bound}[op] if isinstance(value, (int, float)) else True
        return None if ok else f"must be {op} {match.group(2)}"
    if match := _INTERVAL.match(spec):
        left, low, high, right = match.groups()
        if not isinstance(value, (int, float)):
            return None
        low_ok = value >= float(low) if left == "[" else value > float(low)
        high_ok = value <= float(high) if right == "]" else value < float(high)
        return None if low_ok and high_ok else f"must be in {spec}"
    choices = [c.strip() for c in spec.split(",")]
    if all(_CHOICE.match(c) for c in choices):
        names = [c.strip("'") for c in choices]
        return None if str(value) in names else f"must be one of {', '.join(names)}"
    return None  # a range in words: the model checks it


def _range_of(text: str) -> str | None:
    _, found, rest = text.partition("Range:")
    if not found:
        return None
    return rest.strip().rstrip(".").strip() or None


@lru_cache(maxsize=None)
def documented(path: Path) -> dict[str, Setting]:
    """The settings a YAML file documents, by key (top-level keys with a ``# (type)`` comment;
    indented comment lines right below a key continue its comment)."""
    settings: dict[str, Setting] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        match = _KEY_LINE.match(line)
        types = tuple(match.group("types").split(" or ")) if match else ()
        if not types or not set(types) <= {*TYPES, "None"}:
            continue
        text = match.group("text")
        for more in lines[i + 1:]:  # a comment that goes on over indented comment lines
            if not re.match(r"^\s+#", more):
                break
            text += " " + more.strip().lstrip("#").strip()
        if match.group("value").strip() in ("~", "null") and "None" not in types:
            types += ("None",)  # a documented default of ~ is a value the setting takes
        settings[match.group("key")] = Setting(match.group("key"), types, _range_of(text),
                                               Path(path))
    return settings


def schema_for(files) -> dict[str, Setting]:
    """The settings documented by ``files``; a later file's documentation of a key wins, but keeps
    the earlier range where it states none (dataset configs document types only)."""
    schema: dict[str, Setting] = {}
    for path in files:
        for key, setting in documented(Path(path)).items():
            earlier = schema.get(key)
            if setting.range is None and earlier is not None and earlier.types == setting.types:
                setting = earlier
            schema[key] = setting
    return schema


@lru_cache(maxsize=None)
def keys_of(path: Path) -> frozenset[str]:
    """Every top-level key of a YAML file, documented or not."""
    text = Path(path).read_text(encoding="utf-8")
    return frozenset(re.findall(r"^([A-Za-z_]\w*):", text, flags=re.MULTILINE))


def unknown_key(key: str, known) -> str:
    """A sentence for a key that is not a setting, with the nearest known one as a hint."""
    by_lower = {k.lower(): k for k in known}
    near = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.75)
    hint = f": did you mean {by_lower[near[0]]}?" if near else ""
    return f"unknown setting '{key}'{hint}"
