"""Which data a model was trained on: its vocabularies, recorded in each checkpoint and checked.

RecBole numbers items and users 1..N in the order they first appear in the atomic file (after its
filters), and a model's weights are rows of that numbering: the same weights on a dataset numbered
otherwise score other items, without any error. So a checkpoint records::

    {"dataset": str, "file": str (the .inter file's name), "fields": [user, item, time],
     "filters": {setting: value} (the settings that decide which rows and ids survive),
     "items": [token of id 0 ("[PAD]"), token of id 1, ...],
     "users": {"count": int, "sha256": str (of the tokens in id order)}}

Items are kept whole (scores and exported embeddings are read through them); users by count and
hash. :func:`difference` says in one sentence how a dataset differs from a record.
"""

from __future__ import annotations

import hashlib

# Settings that decide which rows, and so which ids, a dataset has.
SHAPING_SETTINGS = ("user_inter_num_interval", "item_inter_num_interval", "val_interval",
                    "rm_dup_inter", "filter_inter_by_user_or_item", "invalid_rows",
                    "duplicate_rows")


def _digest(tokens) -> str:
    return hashlib.sha256("\n".join(map(str, tokens)).encode("utf-8")).hexdigest()


def of(dataset) -> dict:
    """The record of a RecBole dataset (after its filters and id remapping)."""
    config = dataset.config
    users = dataset.field2id_token[dataset.uid_field]
    return {
        "dataset": str(config["dataset"]),
        "file": f"{config['dataset']}.inter",
        "fields": [dataset.uid_field, dataset.iid_field, config["TIME_FIELD"]],
        "filters": {key: _plain(config[key]) for key in SHAPING_SETTINGS},
        "items": [str(t) for t in dataset.field2id_token[dataset.iid_field]],
        "users": {"count": len(users), "sha256": _digest(users)},
    }


def _plain(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def difference(saved: dict, current: dict) -> str | None:
    """How ``current`` differs from ``saved`` (None when it does not): items first, then users;
    the settings that differ, if any, are named as the likely cause."""
    problem = None
    items, here = saved["items"], current["items"]
    if len(items) != len(here):
        problem = f"{len(items) - 1} items in the checkpoint's data, {len(here) - 1} here"
    elif items != here:
        i = next(i for i, (a, b) in enumerate(zip(items, here)) if a != b)
        problem = (f"the items are numbered otherwise (item id {i} is '{items[i]}' in the "
                   f"checkpoint's data, '{here[i]}' here)")
    elif saved["users"] != current["users"]:
        count, now = saved["users"]["count"], current["users"]["count"]
        problem = (f"{count - 1} users in the checkpoint's data, {now - 1} here" if count != now
                   else f"other users ({count - 1} in both)")
    if problem is None:
        return None
    settings = [f"{key} {saved['filters'].get(key)!r} -> {current['filters'].get(key)!r}"
                for key in SHAPING_SETTINGS
                if saved["filters"].get(key) != current["filters"].get(key)]
    if saved["fields"] != current["fields"]:
        settings.append(f"fields {saved['fields']} -> {current['fields']}")
    return problem + (f"; settings changed: {', '.join(settings)}" if settings else "")
