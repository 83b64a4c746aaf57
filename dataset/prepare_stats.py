"""Statistics of a prepared dataset: all rows and after RecBole's k-core filter, with published
figures where they are known."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prepare_rows import Interactions

# RecBole's user_inter_num_interval / item_inter_num_interval "[5,inf)" in the project's configs.
KCORE = 5

# 5-core figures published for the same raw files and the same filter. TiM4Rec's own statistics
# table (arXiv:2409.16182) could not be checked when this was written, so these come from another
# benchmark that reports the same 5-core datasets; none are known for KuaiRand or Steam.
REFERENCE_SOURCE = "OpenP5 benchmark README (Xu, Hua & Zhang, arXiv:2306.11134)"
REFERENCE = {
    "ml-1m": (6040, 3416, 999611),
    "amazon-beauty": (22363, 12101, 198502),
}

# Strings that pandas.read_csv (used by RecBole to load atomic files) turns into NaN by default.
# RecBole then drops the rows whose user or item id is NaN, before the k-core filter. A copy, so
# that preparing needs no pandas; tests/test_prepare.py holds it to pandas' own list.
PANDAS_NA_STRINGS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)


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


def kcore_mask(
    users: np.ndarray, items: np.ndarray, keep: np.ndarray, k: int = KCORE
) -> np.ndarray:
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
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))
        ).rstrip()
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
        print(
            f"published: no {KCORE}-core figures known for {name}; "
            "TiM4Rec's own table could not be checked."
        )
