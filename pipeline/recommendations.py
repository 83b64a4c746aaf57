"""Top-k recommendations from a trained model, for the dataset's users or for new sequences.

The function behind ``recommend.py`` (and ``from pipeline import recommend``). Every result is a row
``(user_id, rank, item_id, score)``, ids as the raw tokens of the dataset file, ranks 1..k with
scores not increasing. Inputs, by ``history``:

- ``all``: each user's whole history (its last ``MAX_ITEM_LIST_LENGTH`` interactions) is the input,
  and every item the user interacted with is left out of the ranking (``keep_seen`` keeps them);
- ``test`` / ``valid``: the input of the test (validation) evaluation, and what that evaluation
  leaves out of the ranking (for RecBole's sequential models, only the padding item), so that the
  rows for every user give the checkpoint's test (validation) Hit@k;
- ``sequences``: new users, ``{"id": ..., "items": [tokens], "timestamps": [Unix seconds]}`` each
  (a JSON Lines file, one object a line, or the objects themselves); timestamps are required by
  models that read times; unknown item tokens are dropped and reported; the sequence's own items
  are left out of the ranking unless ``keep_seen``.

Users are scored a batch (``eval_batch_size``) at a time, and no more than one batch of scores is
held: each batch is reduced to its top k before the next is scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

HISTORIES = ("all", "test", "valid")
COLUMNS = ("user_id", "rank", "item_id", "score")

logger = logging.getLogger(__name__)


def recommend(source, *, users=None, k: int = 10, history: str = "all", sequences=None,
              keep_seen: bool = False, overrides: dict | None = None, allow_pickle: bool = False,
              progress: bool = False):
    """The top ``k`` items for ``users`` (raw tokens; None: every user of the dataset) or for new
    ``sequences``, as a pandas DataFrame with columns ``user_id, rank, item_id, score``.

    ``source`` is a checkpoint's path or what :func:`pipeline.load` returned for one; ``overrides``
    and ``allow_pickle`` are :func:`pipeline.load`'s (for a path).
    """
    import pandas as pd

    frames = list(batches(source, users=users, k=k, history=history, sequences=sequences,
                          keep_seen=keep_seen, overrides=overrides, allow_pickle=allow_pickle,
                          progress=progress))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def batches(source, *, users=None, k: int = 10, history: str = "all", sequences=None,
            keep_seen: bool = False, overrides: dict | None = None, allow_pickle: bool = False,
            progress: bool = False) -> Iterator:
    """:func:`recommend`'s rows, one DataFrame per batch of users (for writing as they come).
    Every argument is checked, and the inputs built, before the first batch is scored."""
    from pipeline.workflow import Loaded, load

    if history not in HISTORIES:
        raise UserError(f"history must be one of {', '.join(HISTORIES)}, got {history!r}")
    if sequences is not None and (users is not None or history != "all"):
        raise UserError("sequences bring their own histories: give them without users or history")
    if keep_seen and history != "all":
        raise UserError(f"--keep-seen applies to history 'all': the {history} evaluation leaves "
                        f"out no seen items")
    loaded = source if isinstance(source, Loaded) else load(source, overrides,
                                                            allow_pickle=allow_pickle)
    items = loaded.dataset.field2id_token[loaded.dataset.iid_field]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(items) - 1:
        raise UserError(f"k must be an integer from 1 to the {len(items) - 1} items, got {k!r}")
    if sequences is not None:
        inputs = _NewSequences(loaded, _read_sequences(sequences, loaded), keep_seen)
    elif history == "all":
        inputs = _WholeHistories(loaded, _user_ids(loaded, users), keep_seen)
    else:
        split = loaded.test_data if history == "test" else loaded.valid_data
        inputs = _EvaluationInputs(loaded, split._dataset, _user_ids(loaded, users), history)
    return _scored(loaded, inputs, k, items, progress)


def _scored(loaded, inputs, k: int, items, progress: bool) -> Iterator:
    import pandas as pd
    import torch
    from tqdm import tqdm

    model, device = loaded.model.eval(), loaded.config["device"]
    items = np.asarray(items, dtype=object)  # once: each batch picks B x k of its tokens
    size = int(loaded.config["eval_batch_size"])
    starts = range(0, len(inputs), size)
    for start in tqdm(starts, total=len(starts), desc="Recommend", leave=False, ncols=100,
                      disable=None if progress else True):  # None: a bar on terminals only
        names, interaction, seen = inputs.batch(start, min(start + size, len(inputs)))
        with torch.no_grad():
            scores = model.full_sort_predict(interaction.to(device))
            scores = scores.view(len(names), -1).float()  # [B n_items]
            scores[:, 0] = -torch.inf  # the padding item
            if seen is not None:
                scores[seen[0].to(device), seen[1].to(device)] = -torch.inf
            top_scores, top_items = torch.topk(scores, k)  # [B k]
        del scores
        top_scores, top_items = top_scores.cpu().numpy(), top_items.cpu().numpy()
        keep = np.isfinite(top_scores)  # fewer than k items left for a user who has seen most
        rows = np.nonzero(keep)
        yield pd.DataFrame({
            "user_id": np.asarray(names, dtype=object)[rows[0]],
            "rank": rows[1] + 1,
            "item_id": items[top_items[rows]],
            "score": top_scores[rows].astype(np.float64),
        })


def _user_ids(loaded, users) -> np.ndarray:
    """The dataset ids of ``users`` (raw tokens), or of every user."""
    dataset = loaded.dataset
    tokens = dataset.field2id_token[dataset.uid_field]
    if users is None:
        return np.arange(1, len(tokens))
    ids = dataset.field2token_id[dataset.uid_field]
    missing = [str(u) for u in users if str(u) not in ids]
    if missing:
        raise UserError(f"unknown user {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + f": not in dataset '{dataset.dataset_name}' after its filters")
    return np.array([ids[str(u)] for u in users], dtype=np.int64)


def _reads_time(model) -> bool:
    return hasattr(model, "TIME_SEQ") and bool(getattr(model, "is_time", True))


class _WholeHistories:
    """Each user's last L interactions as the input; every item of the user's history seen."""

    def __init__(self, loaded, uids: np.ndarray, keep_seen: bool):
        import torch

        dataset, config = loaded.dataset, loaded.config
        self.users = np.asarray(dataset.field2id_token[dataset.uid_field], dtype=object)
        self.uids, self.keep_seen = uids, keep_seen
        self.length = int(config["MAX_ITEM_LIST_LENGTH"])
        self.fields = (dataset.uid_field, config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"],
                       config["ITEM_LIST_LENGTH_FIELD"])
        inter = loaded.interactions
        user = inter[dataset.uid_field].to_numpy(np.int64)
        item = inter[dataset.iid_field].to_numpy(np.int64)
        time_field = config["TIME_FIELD"]
        times = inter[time_field].to_numpy() if time_field in inter.columns else None
        # RecBole's order: by user, then time, ties in file order (stable sorts)
        order = np.lexsort((times, user)) if times is not None else np.argsort(user, kind="stable")
        self.item = torch.from_numpy(item[order])
        self.time = torch.from_numpy(times[order]) if times is not None else None
        self.time_list = time_field + config["LIST_SUFFIX"] if times is not None else None
        user = user[order]
        self.begin = np.searchsorted(user, uids, side="left")
        self.end = np.searchsorted(user, uids, side="right")

    def __len__(self):
        return len(self.uids)

    def batch(self, lo: int, hi: int):
        import torch
        from recbole.data.interaction import Interaction

        begin, end = self.begin[lo:hi], self.end[lo:hi]
        lengths = np.minimum(end - begin, self.length)
        slots = np.arange(self.length)
        real = slots[None, :] < lengths[:, None]  # [B L]
        where = np.where(real, (end - lengths)[:, None] + slots[None, :], 0)  # [B L]
        where, real = torch.from_numpy(where), torch.from_numpy(real)
        user_field, seq_field, len_field = self.fields
        data = {user_field: torch.from_numpy(self.uids[lo:hi]),
                seq_field: torch.where(real, self.item[where], 0),
                len_field: torch.from_numpy(lengths)}
        if self.time is not None:
            data[self.time_list] = torch.where(real, self.time[where], 0)
        seen = None
        if not self.keep_seen:
            counts = end - begin
            rows = np.repeat(np.arange(hi - lo), counts)
            # each user's rows of the sorted history: begin, begin + 1, ..., end - 1
            positions = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            seen = (torch.from_numpy(rows), self.item[np.repeat(begin, counts) + positions])
        return list(self.users[self.uids[lo:hi]]), Interaction(data), seen


class _EvaluationInputs:
    """The rows of a split's evaluation: its inputs, nothing left out but the padding item."""

    def __init__(self, loaded, split, uids: np.ndarray, history: str):
        dataset = loaded.dataset
        self.split, self.transform = split, getattr(loaded.test_data, "transform", None)
        self.users = np.asarray(dataset.field2id_token[dataset.uid_field], dtype=object)
        row_user = split.inter_feat[dataset.uid_field].numpy()
        where = {int(u): i for i, u in enumerate(row_user)}
        missing = [u for u in uids if int(u) not in where]
        if missing:
            raise UserError(f"user {self.users[missing[0]]!r} has no {history} interaction")
        self.rows = np.array([where[int(u)] for u in uids], dtype=np.int64)

    def __len__(self):
        return len(self.rows)

    def batch(self, lo: int, hi: int):
        rows = self.rows[lo:hi]
        interaction = self.split[rows]
        if self.transform is not None:  # as the evaluation's loader hands it to the model
            interaction = self.transform(self.split, interaction)
        uid_field = self.split.uid_field
        return list(self.users[interaction[uid_field].numpy()]), interaction, None


def _read_sequences(sequences, loaded) -> list[dict]:
    """The new users' sequences, checked: a JSON Lines path, or a list of dicts. UserError names
    the first malformed line; unknown item tokens are dropped and reported in one warning."""
    model = loaded.model
    if hasattr(model, "user_embedding"):
        raise UserError(f"{type(model).__name__} learns an embedding per user: it recommends for "
                        f"the dataset's users only, not for new sequences")
    needs_time = _reads_time(model)
    if isinstance(sequences, (str, Path)):
        path = Path(sequences)
        if not path.is_file():
            raise UserError(f"sequences file not found: {path}")
        where = str(path)
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
        records = []
        for n, line in lines:
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as error:
                raise UserError(f"{where} line {n}: not JSON ({error.msg})") from None
    else:
        where, records = "sequences", list(enumerate(sequences, 1))
    dataset = loaded.dataset
    item_ids = dataset.field2token_id[dataset.iid_field]
    parsed, unknown, empty, first_line = [], {}, [], {}
    for n, record in records:
        seq = _checked_record(record, needs_time, f"{where} line {n}")
        if seq["id"] in first_line:
            raise UserError(f"{where} line {n}: id {seq['id']!r} is also on line "
                            f"{first_line[seq['id']]}")
        first_line[seq["id"]] = n
        known = [i for i, token in enumerate(seq["items"]) if token in item_ids]
        if len(known) < len(seq["items"]):
            unknown[n] = [t for t in seq["items"] if t not in item_ids]
        if not known:
            empty.append((n, seq["id"]))
            continue
        seq["items"] = [item_ids[seq["items"][i]] for i in known]
        if seq["timestamps"] is not None:
            seq["timestamps"] = [seq["timestamps"][i] for i in known]
        parsed.append(seq)
    if unknown:
        count = sum(map(len, unknown.values()))
        lines = list(unknown)
        shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
        logger.warning(f"{where}: {count} unknown item token{'s' if count > 1 else ''} dropped "
                       f"(lines {shown}; the first: {unknown[lines[0]][0]!r})")
    for n, user in empty:
        logger.error(f"{where} line {n}: no known items left for {user!r}: no recommendations")
    return parsed


def _checked_record(record, needs_time: bool, where: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with id, items and timestamps")
    if "id" not in record or not isinstance(record["id"], (str, int)):
        raise UserError(f"{where}: 'id' (a string or an integer) is missing")
    items = record.get("items")
    if not isinstance(items, list) or not items or not all(
            isinstance(t, (str, int)) and not isinstance(t, bool) for t in items):
        raise UserError(f"{where}: 'items' must be a non-empty list of item tokens")
    times = record.get("timestamps")
    if times is None and needs_time:
        raise UserError(f"{where}: 'timestamps' is missing, and the model reads times")
    if times is not None:
        if not isinstance(times, list) or len(times) != len(items) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and np.isfinite(t)
                for t in times):
            raise UserError(f"{where}: 'timestamps' must be one number per item "
                            f"({len(items)} items)")
        if any(b < a for a, b in zip(times, times[1:])):
            raise UserError(f"{where}: 'timestamps' go back in time: a sequence is in the order "
                            f"of its interactions")
    return {"id": str(record["id"]), "items": [str(t) for t in items], "timestamps": times}


class _NewSequences:
    """New users' sequences as inputs (their last L items); their own items seen."""

    def __init__(self, loaded, sequences: list[dict], keep_seen: bool):
        config = loaded.config
        self.sequences, self.keep_seen = sequences, keep_seen
        self.length = int(config["MAX_ITEM_LIST_LENGTH"])
        self.seq_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
        self.len_field = config["ITEM_LIST_LENGTH_FIELD"]
        self.time_field = config["TIME_FIELD"] + config["LIST_SUFFIX"]

    def __len__(self):
        return len(self.sequences)

    def batch(self, lo: int, hi: int):
        import torch
        from recbole.data.interaction import Interaction

        chosen = self.sequences[lo:hi]
        items = torch.zeros(len(chosen), self.length, dtype=torch.long)
        times = torch.zeros(len(chosen), self.length, dtype=torch.float32)
        lengths = torch.zeros(len(chosen), dtype=torch.long)
        rows, cols = [], []
        for b, seq in enumerate(chosen):
            last = seq["items"][-self.length:]
            items[b, :len(last)] = torch.tensor(last)
            lengths[b] = len(last)
            if seq["timestamps"] is not None:
                times[b, :len(last)] = torch.tensor(seq["timestamps"][-self.length:],
                                                    dtype=torch.float64).float()
            rows += [b] * len(seq["items"])
            cols += seq["items"]
        data = {self.seq_field: items, self.len_field: lengths}
        if any(seq["timestamps"] is not None for seq in chosen):
            data[self.time_field] = times
        seen = None if self.keep_seen else (torch.tensor(rows), torch.tensor(cols))
        return [seq["id"] for seq in chosen], Interaction(data), seen


def export_embeddings(source, path, *, overrides: dict | None = None,
                      allow_pickle: bool = False) -> Path:
    """Write the item embedding table to ``path`` (``.npz``: ``tokens``, the items' raw tokens,
    and ``vectors``, one row each; the padding item is left out). ``source`` is a checkpoint's path
    or :func:`pipeline.load`'s result. Returns the path."""
    from pipeline.workflow import Loaded, load, read_checkpoint

    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"embeddings are written as .npz (tokens and vectors): {path}")
    check_output(path)
    if isinstance(source, Loaded):
        data, tokens = source.checkpoint, source.dataset.field2id_token[source.dataset.iid_field]
    else:
        data = read_checkpoint(Path(source), allow_pickle)
        if data.get("data") is not None:  # the checkpoint names its items: no dataset needed
            tokens = data["data"]["items"]
        else:
            loaded = load(source, overrides, allow_pickle=allow_pickle)
            data, tokens = loaded.checkpoint, loaded.dataset.field2id_token[
                loaded.dataset.iid_field]
    from pipeline.checkpoint import write_atomically

    weight = data["state_dict"].get("item_embedding.weight")
    if weight is None:
        raise UserError(f"{data['model']} has no item_embedding table to export")
    vectors = weight[1:len(tokens)].float().cpu().numpy()
    with write_atomically(path) as f:
        np.savez(f, tokens=np.asarray(tokens[1:], dtype=str), vectors=vectors)
    return path


def check_output(path: Path) -> None:
    """UserError unless ``path`` can be written: its folder exists and takes new files."""
    from pipeline.runlog import check_writable

    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist")
    if path.is_dir():
        raise UserError(f"output {path} is a folder")
    check_writable(folder, "output folder")
