"""Using a trained model: recommend.py and the Python API (train, evaluate, load, recommend)."""

import csv
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

import pipeline
from pipeline import ROOT
from pipeline.cli import recommend_main
from pipeline.errors import UserError
from tests.conftest import write_inter
from tests.test_cli import run_and_fail

TINY = {"MAX_ITEM_LIST_LENGTH": 10, "hidden_size": 16, "d_state": 8, "head_dim": 8,
        "chunk_size": 4, "topk": [5, 10], "show_progress": False, "use_gpu": False,
        "state": "ERROR", "train_batch_size": 64, "eval_batch_size": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TiM4Rec trained for two epochs on the tiny dataset through the API."""
    root = tmp_path_factory.mktemp("recommend")
    write_inter(root / "data" / "tiny" / "tiny.inter", n_users=60)
    result = pipeline.train(overrides={
        **TINY, "dataset": "tiny", "data_path": str(root / "data"), "epochs": 2,
        "checkpoint_dir": str(root / "saved"), "log_dir": str(root / "log"),
        "tensorboard_dir": str(root / "tb")}, quiet=True)
    return result, pipeline.load(result["checkpoint"])


def test_recommending_every_user_with_the_test_history_gives_the_test_hit_rate(trained):
    result, loaded = trained
    rows = pipeline.recommend(loaded, k=10, history="test")
    split = loaded.test_data._dataset
    tokens = loaded.dataset.field2id_token
    target = {tokens["user_id"][u]: tokens["item_id"][i]
              for u, i in zip(split.inter_feat["user_id"].tolist(),
                              split.inter_feat["item_id"].tolist())}
    hits = rows.groupby("user_id").apply(lambda r: target[r.name] in set(r["item_id"]),
                                         include_groups=False)
    assert len(hits) == len(target)
    assert round(float(hits.mean()), 4) == round(result["test_result"]["hit@10"], 4)
    assert round(float(hits.mean()), 4) == round(pipeline.evaluate(
        result["checkpoint"], quiet=True)["test_result"]["hit@10"], 4)


def test_rows_are_ranked_tokens_and_seen_items_are_left_out(trained):
    _, loaded = trained
    rows = pipeline.recommend(loaded, users=["3", "1"], k=5)
    assert list(rows.columns) == ["user_id", "rank", "item_id", "score"]
    assert list(rows["user_id"]) == ["3"] * 5 + ["1"] * 5  # in the order asked
    for _, user in rows.groupby("user_id"):
        assert list(user["rank"]) == [1, 2, 3, 4, 5]
        assert (np.diff(user["score"].to_numpy()) <= 0).all()
    inter = loaded.interactions  # every interaction (the dataset's own rows are samples now)
    tokens = loaded.dataset.field2id_token
    seen = {tokens["item_id"][i] for u, i in zip(inter["user_id"], inter["item_id"])
            if tokens["user_id"][u] == "1"}
    assert len(seen) >= 5
    assert not seen & set(rows[rows.user_id == "1"]["item_id"])
    kept = pipeline.recommend(loaded, users=["1"], k=30 - 1, keep_seen=True)
    assert seen <= set(kept["item_id"])  # every item but the padding one is ranked


def test_whole_history_input_is_the_users_last_interactions(trained):
    """history 'all' scores what the model would score for the user's next item: the input is
    the test input with the test item appended (the last L items)."""
    _, loaded = trained
    from pipeline.recommendations import _WholeHistories

    split = loaded.test_data._dataset
    users = split.inter_feat["user_id"][:4].numpy()
    names, interaction, seen = _WholeHistories(loaded, users, keep_seen=False).batch(0, 4)
    for b in range(4):
        n = int(split.inter_feat["item_length"][b])
        before = split.inter_feat["item_id_list"][b, :n].tolist()
        expected = (before + [int(split.inter_feat["item_id"][b])])[-10:]
        got = interaction["item_id_list"][b, :interaction["item_length"][b]].tolist()
        assert got == expected
        times = interaction["timestamp_list"][b, :len(expected)]
        assert (times[1:] >= times[:-1]).all()
    assert seen[0].max() == 3


def test_new_sequences(trained, tmp_path, caplog):
    _, loaded = trained
    caplog.set_level(logging.WARNING, logger="pipeline.recommendations")
    items = loaded.dataset.field2id_token["item_id"]
    lines = [{"id": "new-1", "items": [items[1], items[2], "no-such-item"],
              "timestamps": [1_000_000_000, 1_000_000_100, 1_000_000_200]},
             {"id": 7, "items": ["unknown"], "timestamps": [1_000_000_000]},
             {"id": "new-2", "items": [items[3]], "timestamps": [1_000_000_000]}]
    path = tmp_path / "new.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = pipeline.recommend(loaded, sequences=path, k=4)
    assert list(dict.fromkeys(rows["user_id"])) == ["new-1", "new-2"]
    assert not {items[1], items[2]} & set(rows[rows.user_id == "new-1"]["item_id"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 unknown item tokens dropped (lines 1, 2; the first: 'no-such-item')" in m
               for m in messages), messages
    assert any("line 2: no known items left for '7'" in m for m in messages), messages
    again = pipeline.recommend(loaded, sequences=lines[2:], k=4)  # the objects themselves
    alone = rows[rows.user_id == "new-2"].reset_index(drop=True)
    assert again[["user_id", "rank", "item_id"]].equals(alone[["user_id", "rank", "item_id"]])
    assert np.allclose(again["score"], alone["score"], atol=1e-5)  # scored in another batch


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2: not JSON"),
    ('{"id": "u", "items": []}', "line 2: 'items' must be a non-empty list"),
    ('{"id": "u", "items": ["1"]}', "line 2: 'timestamps' is missing, and the model reads times"),
    ('{"id": "u", "items": ["1", "2"], "timestamps": [5]}', "one number per item"),
    ('{"id": "u", "items": ["1", "2"], "timestamps": [5, 4]}', "go back in time"),
    ('{"id": "a", "items": ["1"], "timestamps": [5]}', "line 2: id 'a' is also on line 1"),
])
def test_malformed_sequences_name_their_line(trained, tmp_path, line, message):
    _, loaded = trained
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "items": ["1"], "timestamps": [1]}\n' + line + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipeline.recommend(loaded, sequences=path)


def test_no_more_than_one_batch_of_scores_is_held(trained, monkeypatch):
    """Each batch is reduced to its top k, and handed on, before the next one is scored."""
    _, loaded = trained
    from pipeline.recommendations import batches

    calls = []
    original = loaded.model.full_sort_predict
    monkeypatch.setattr(loaded.model, "full_sort_predict",
                        lambda inter: calls.append(len(inter)) or original(inter))
    frames = batches(loaded, k=3)
    assert calls == []  # inputs built and checked, nothing scored yet
    first = next(frames)
    assert calls == [16] and len(first) == 16 * 3
    assert sum(len(f) for f in frames) + len(first) == 3 * (len(
        loaded.dataset.field2id_token["user_id"]) - 1)
    assert max(calls) == 16


def test_the_cli_writes_csv_and_the_embeddings(trained, tmp_path):
    result, loaded = trained
    out = tmp_path / "rec.csv"
    recommend_main([f"--checkpoint={result['checkpoint']}", "--users=2,5", "--k=3",
                    f"--out={out}"])
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["user_id", "rank", "item_id", "score"] and len(rows) == 7
    assert [r[:2] for r in rows[1:4]] == [["2", "1"], ["2", "2"], ["2", "3"]]
    api = pipeline.recommend(loaded, users=["2", "5"], k=3)
    assert [r[2] for r in rows[1:]] == list(api["item_id"])

    npz = tmp_path / "items.npz"
    recommend_main([f"--checkpoint={result['checkpoint']}", f"--export-embeddings={npz}"])
    table = np.load(npz)
    weight = loaded.model.item_embedding.weight.detach()
    assert list(table["tokens"]) == list(loaded.dataset.field2id_token["item_id"][1:])
    assert np.allclose(table["vectors"], weight[1:].numpy())


def test_bad_recommend_input(trained, tmp_path, capsys):
    result, _ = trained
    ckpt = f"--checkpoint={result['checkpoint']}"
    renumbered = tmp_path / "data" / "tiny" / "tiny.inter"
    write_inter(renumbered, n_users=60)
    lines = renumbered.read_text().splitlines(keepends=True)
    renumbered.write_text(lines[0] + "".join(lines[:0:-1]))
    cases = [
        ([ckpt, "--k=0"], "k must be an integer from 1 to the 30 items, got 0"),
        ([ckpt, "--k=31"], "got 31"),
        ([ckpt, "--users=1,nobody"], "unknown user 'nobody'"),
        ([ckpt, f"--out={tmp_path / 'no' / 'such' / 'x.csv'}"], "output folder"),
        ([ckpt, "--out=/proc/x.csv"], "is not writable"),
        ([ckpt, "--history=test", "--keep-seen"], "--keep-seen applies to history 'all'"),
        ([ckpt, f"--data_path={tmp_path / 'data'}"], "was trained on other data"),
        ([f"--checkpoint={tmp_path / 'missing.pth'}"], "checkpoint not found"),
        ([ckpt, f"--export-embeddings={tmp_path / 'e.txt'}"], "written as .npz"),
    ]
    for argv, message in cases:
        assert message in run_and_fail(recommend_main, argv, capsys), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_the_api_documented_in_the_readme_runs(trained):
    """The README's example, as written there (its data path and epochs made tiny)."""
    result, _ = trained
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Use a trained model")[1].split("```python")[1].split("```")[0]
    assert "pipeline.train" in block or "train(" in block
    assert '"config/config4ml100k_64d.yaml"' in block and '{"epochs": 5}' in block  # replaced below
    code = block.replace('"config/config4ml100k_64d.yaml"', repr(str(
        ROOT / "config" / "config4ml100k_64d.yaml")))
    settings = {**TINY, **{k: result["config"][k] for k in (
        "dataset", "data_path", "checkpoint_dir", "log_dir", "tensorboard_dir")}, "epochs": 1}
    namespace = {"SETTINGS": settings}
    exec(compile(code.replace('{"epochs": 5}', "SETTINGS"), "README", "exec"), namespace)
    assert {"result", "rows"} <= set(namespace)
    assert list(namespace["rows"].columns) == ["user_id", "rank", "item_id", "score"]


def test_recommend_py_prints_a_table(trained):
    result, _ = trained
    proc = subprocess.run([sys.executable, str(ROOT / "recommend.py"),
                           f"--checkpoint={result['checkpoint']}", "--users=4", "--k=2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["user_id", "rank", "item_id", "score"] and len(lines) == 3
    assert lines[1].split()[:2] == ["4", "1"]


def test_weights_follow_the_checkpoint_not_the_data_it_is_given(trained):
    _, loaded = trained
    saved = torch.load(loaded.path, weights_only=True)
    assert saved["data"]["items"] == list(loaded.dataset.field2id_token["item_id"])
    assert saved["data"]["users"]["count"] == len(loaded.dataset.field2id_token["user_id"])
