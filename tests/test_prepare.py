"""Tests of dataset/prepare.py on small fixtures written in each official raw format.

Most tests run the script as a user would (a child process), so exit status, stdout and stderr are
checked exactly as seen from the shell. The k-core test compares the script's filter with RecBole's
own Dataset filtering. Two tests use the real data under ../shared/datasets and skip when that
folder is absent (a user's clone has none).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "dataset" / "prepare.py"
SHARED = REPO_ROOT.parent / "shared" / "datasets"

# prepare.py and its modules import each other as top-level modules, as when run as a script.
# Appended, not prepended: the folder also holds prepared datasets, which must shadow nothing.
if str(SCRIPT.parent) not in sys.path:
    sys.path.append(str(SCRIPT.parent))
import prepare  # noqa: E402
import prepare_readers  # noqa: E402
import prepare_rows  # noqa: E402
import prepare_stats  # noqa: E402

RATED_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def run_prepare(*args: object, out: Path | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    if out is not None:
        cmd += ["--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def prepared(out: Path, name: str) -> str:
    return (out / name / f"{name}.inter").read_text(encoding="utf-8")


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---------------------------------------------------------------------------------------------
# Fixtures in the official raw formats
# ---------------------------------------------------------------------------------------------

# Users out of order, times out of order within a user, and same-second ties (user 2 and user 10)
# whose file order must survive. User 10 comes after user 2: users sort as numbers.
ML_RATINGS = """\
10::1193::5::978300760
2::661::3::978302109
10::914::3::978301968
2::3408::4::978300275
10::2355::5::978300760
1::1287::5::978302039
10::594::4::978300760
2::595::5::978300275
"""
ML_EXPECTED = RATED_HEADER + """\
1\t1287\t5\t978302039
2\t3408\t4\t978300275
2\t595\t5\t978300275
2\t661\t3\t978302109
10\t1193\t5\t978300760
10\t2355\t5\t978300760
10\t594\t4\t978300760
10\t914\t3\t978301968
"""

# The 2014 ratings-only CSV: reviewer ids sort as strings, item ids keep leading zeros,
# ratings lose a trailing '.0' but keep a real fraction.
AMAZON_CSV = """\
A3NZ1Y0S3YEY3V,B00004TMFE,5.0,1390953600
A1YJEY40YUW4SE,7806397051,1.0,1391040000
A3NZ1Y0S3YEY3V,B00004TUBL,4.0,1364256000
A1YJEY40YUW4SE,B00004TUBV,4.5,1391040000
A60XNB876KYML,7806397051,3.0,1397174400
A3NZ1Y0S3YEY3V,0205616461,2.0,1390953600
"""
AMAZON_EXPECTED = RATED_HEADER + """\
A1YJEY40YUW4SE\t7806397051\t1\t1391040000
A1YJEY40YUW4SE\tB00004TUBV\t4.5\t1391040000
A3NZ1Y0S3YEY3V\tB00004TUBL\t4\t1364256000
A3NZ1Y0S3YEY3V\tB00004TMFE\t5\t1390953600
A3NZ1Y0S3YEY3V\t0205616461\t2\t1390953600
A60XNB876KYML\t7806397051\t3\t1397174400
"""

KUAIRAND_CSV = """\
user_id,video_id,date,hourmin,time_ms,is_click,is_like,play_time_ms,tab
0,101,20220408,1000,1649412412946,1,0,3000,1
0,102,20220408,1000,1649412410000,0,0,200,1
27,103,20220408,1000,1649412413100,1,0,9000,4
3,101,20220408,1000,1649412400000,1,1,5000,1
0,104,20220408,1000,1649412412946,1,0,100,1
"""
KUAIRAND_EXPECTED = """\
user_id:token\titem_id:token\ttimestamp:float
0\t101\t1649412412.946
0\t104\t1649412412.946
3\t101\t1649412400
27\t103\t1649412413.1
"""

# Python-literal dicts as in steam_reviews.json.gz: single quotes, u'' prefixes, True/False,
# a user_id on some reviews only, a username holding double quotes and one that is not ASCII.
STEAM_LINES = [
    "{'username': 'Chaos Syren', 'hours': 0.1, 'products': 41, 'product_id': '725280', "
    "'page_order': 0, 'date': '2017-12-17', 'text': 'It\\'s \"fine\"', 'early_access': False, "
    "'page': 1}",
    "{u'username': u'the \"King\"', u'product_id': u'35140', u'date': u'2018-01-04', "
    "u'text': u'caf\\u00e9', u'user_id': u'76561198007483075', u'early_access': True, "
    "u'found_funny': 2}",
    "{'username': 'Chaos Syren', 'product_id': '328100', 'date': '2017-12-17', 'hours': 2.5}",
    "{'username': 'Chaos Syren', 'product_id': '35140', 'date': '2017-12-01'}",
    "{'username': '\\xe4rger', 'product_id': '725280', 'date': '2016-02-29'}",
]
STEAM_EXPECTED = "".join(line + "\n" for line in [
    "user_id:token\tproduct_id:token\ttimestamp:float",
    "Chaos Syren\t35140\t1512086400",
    "Chaos Syren\t725280\t1513468800",
    "Chaos Syren\t328100\t1513468800",
    '"the ""King"""\t35140\t1515024000',  # quoted: RecBole's pandas reader gives back: the "King"
    "\u00e4rger\t725280\t1456704000",
])


def amazon_json_lines() -> list[str]:
    """The AMAZON_CSV records as 5-core review objects, with the fields the real files carry."""
    lines = []
    for user, item, rating, stamp in (row.split(",") for row in AMAZON_CSV.splitlines()):
        review = {"reviewerID": user, "asin": item, "reviewerName": "J. Doe", "helpful": [0, 0],
                  "reviewText": "Works, \"really\".", "overall": float(rating), "summary": "ok",
                  "unixReviewTime": int(stamp), "reviewTime": "01 29, 2014"}
        lines.append(json.dumps(review))
    return lines


def write_ml_zip(path: Path, ratings: str = ML_RATINGS) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ml-1m/movies.dat", "1::Toy Story (1995)::Animation|Children's|Comedy\n")
        archive.writestr("ml-1m/ratings.dat", ratings)
        archive.writestr("ml-1m/README", "SUMMARY\n")
    return path


def write_gzip(path: Path, text: str) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def steam_gz(tmp_path: Path) -> Path:
    return write_gzip(tmp_path / "steam_reviews.json.gz", "\n".join(STEAM_LINES) + "\n")


# ---------------------------------------------------------------------------------------------
# Each format gives the expected atomic file, row for row
# ---------------------------------------------------------------------------------------------


def amazon_json_text() -> str:
    return "\n".join(amazon_json_lines()) + "\n"


# Each official raw format: (dataset name, raw file written under a folder, expected atomic file).
GOOD_INPUTS = {
    "ml-1m zip": ("ml-1m", lambda p: write_ml_zip(p / "ml-1m.zip"), ML_EXPECTED),
    "ml-1m ratings.dat": ("ml-1m", lambda p: write_text(p / "ratings.dat", ML_RATINGS),
                          ML_EXPECTED),
    "amazon csv": ("amazon-beauty", lambda p: write_text(p / "ratings_Beauty.csv", AMAZON_CSV),
                   AMAZON_EXPECTED),
    "amazon json": ("amazon-sports",
                    lambda p: write_text(p / "reviews_Sports_and_Outdoors_5.json",
                                         amazon_json_text()),
                    AMAZON_EXPECTED),
    "amazon json.gz": ("amazon-sports",
                       lambda p: write_gzip(p / "reviews_Sports_and_Outdoors_5.json.gz",
                                            amazon_json_text()),
                       AMAZON_EXPECTED),
    "kuairand clicks": ("kuairand",
                        lambda p: write_text(p / "log_standard_4_08_to_4_21_pure.csv",
                                             KUAIRAND_CSV),
                        KUAIRAND_EXPECTED),
    "steam literals": ("steam", steam_gz, STEAM_EXPECTED),
}


@pytest.mark.parametrize("case", list(GOOD_INPUTS), ids=list(GOOD_INPUTS))
def test_raw_format_gives_expected_atomic_file(tmp_path, case):
    name, make_raw, expected = GOOD_INPUTS[case]
    result = run_prepare(name, make_raw(tmp_path), out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert prepared(tmp_path / "out", name) == expected
    assert "5-core" in result.stdout


def test_runs_where_python_puts_no_script_folder_on_the_path(tmp_path):
    """``python -P`` (or PYTHONSAFEPATH) leaves the script's folder off sys.path: the script
    still finds its sibling modules, from any working directory."""
    if sys.version_info < (3, 11):
        pytest.skip("python -P is Python 3.11's")
    name, make_raw, expected = GOOD_INPUTS["steam literals"]
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-P", str(SCRIPT), name, str(make_raw(tmp_path)),
                             "--out", str(out)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert prepared(out, name) == expected


def test_kuairand_folder_reads_logs_in_name_order(tmp_path):
    logs = tmp_path / "KuaiRand-Pure" / "data"
    logs.mkdir(parents=True)
    header, *rows = KUAIRAND_CSV.splitlines(keepends=True)
    # Same-millisecond tie across files: the earlier file name comes first.
    write_text(logs / "log_standard_4_22_to_5_08_pure.csv",
               header + "5,200,x,1,1649999999000,1,0,1,1\n")
    write_text(logs / "log_random_4_22_to_5_08_pure.csv",
               header + "5,201,x,1,1649999999000,1,0,1,1\n")
    write_text(logs / "user_features_pure.csv", "user_id,x\n5,1\n")  # not a log: ignored
    result = run_prepare("kuairand", logs, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert prepared(tmp_path / "out", "kuairand").splitlines()[1:] == [
        "5\t201\t1649999999", "5\t200\t1649999999",
    ]


# ---------------------------------------------------------------------------------------------
# Order, determinism, number formatting
# ---------------------------------------------------------------------------------------------


def test_ties_keep_file_order(tmp_path):
    rng = random.Random(3)
    items = list(range(1, 61))
    rng.shuffle(items)
    # Two users interleaved, every rating at the same second, items in a shuffled file order.
    lines = [f"{1 + n % 2}::{item}::3::978300000" for n, item in enumerate(items)]
    raw = write_text(tmp_path / "ratings.dat", "\n".join(lines) + "\n")
    result = run_prepare("ml-1m", raw, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in prepared(tmp_path / "out", "ml-1m").splitlines()[1:]]
    for user in ("1", "2"):
        got = [int(item) for u, item, _, _ in rows if u == user]
        assert got == [item for n, item in enumerate(items) if str(1 + n % 2) == user]


@pytest.mark.parametrize("case", ["ml-1m zip", "amazon csv", "kuairand clicks", "steam literals"])
def test_same_input_gives_identical_bytes(tmp_path, case):
    name, make_raw, _ = GOOD_INPUTS[case]
    raw = make_raw(tmp_path)
    first = run_prepare(name, raw, out=tmp_path / "a")
    second = run_prepare(name, raw, out=tmp_path / "b")
    assert first.returncode == second.returncode == 0
    path = Path(name) / f"{name}.inter"
    assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    assert (first.stdout.replace(str(tmp_path / "a"), "")
            == second.stdout.replace(str(tmp_path / "b"), ""))


def test_number_formatting_round_trips():
    assert [prepare_rows.format_number(t) for t in ("5", "5.0", "4.5", "0.1", "-0.0", "1e3")] == [
        "5", "5", "4.5", "0.1", "0", "1000",
    ]
    for ticks in (1649412412946, 1649412413000, 1649412413100, 5, -1500):
        text = prepare_rows.format_ticks(ticks, 1000)
        assert float(text) == ticks / 1000
        assert not text.endswith("0") or "." not in text
    assert prepare_rows.format_ticks(978300760, 1) == "978300760"


def test_default_out_is_the_scripts_folder(tmp_path):
    args = prepare.build_parser().parse_args(["ml-1m", "ratings.dat"])
    assert args.out == SCRIPT.parent


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------


def truncated_gzip(tmp_path: Path) -> Path:
    # Text that does not compress away, so cutting the tail cuts real data.
    rng = random.Random(0)
    lines = [STEAM_LINES[0].replace("It\\'s", "".join(rng.choices("abcdefgh", k=300)))] * 50
    path = write_gzip(tmp_path / "steam_reviews.json.gz", "\n".join(lines) + "\n")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def zip_without_ratings(tmp_path: Path) -> Path:
    path = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ml-1m/movies.dat", "1::Toy Story (1995)::Comedy\n")
    return path


def truncated_zip(tmp_path: Path) -> Path:
    path = write_ml_zip(tmp_path / "ml-1m.zip")
    path.write_bytes(path.read_bytes()[:60])
    return path


BAD_INPUTS = {
    "wrong format": ("ml-1m", lambda p: write_text(p / "ratings.dat", AMAZON_CSV),
                     "expected UserID::MovieID::Rating::Timestamp"),
    "truncated gzip": ("steam", truncated_gzip, "truncated or corrupt"),
    "missing column": ("kuairand",
                       lambda p: write_text(p / "log.csv", "user_id,video_id,time_ms\n1,2,3\n"),
                       "missing column is_click"),
    "empty file": ("ml-1m", lambda p: write_text(p / "ratings.dat", ""), "no interactions found"),
    "missing raw path": ("ml-1m", lambda p: p / "nowhere" / "ml-1m.zip", "no such file"),
    "amazon json missing field": ("amazon-beauty",
                                  lambda p: write_text(p / "r.json",
                                                       '{"reviewerID": "A", "overall": 5.0, '
                                                       '"unixReviewTime": 1}\n'),
                                  "missing field asin"),
    "amazon csv with header": ("amazon-beauty",
                               lambda p: write_text(p / "r.csv",
                                                    "user,item,rating,timestamp\n" + AMAZON_CSV),
                               "has no header"),
    "zip without ratings.dat": ("ml-1m", zip_without_ratings, "no ratings.dat"),
    "truncated zip": ("ml-1m", truncated_zip, "not a valid zip"),
    "kuairand header only": ("kuairand",
                             lambda p: write_text(p / "log.csv",
                                                  KUAIRAND_CSV.splitlines()[0] + "\n"),
                             "no interactions found"),
    "steam json not python": ("steam",
                              lambda p: write_gzip(p / "s.json.gz",
                                                   '{"username": "a", "ok": true}\n'),
                              "not a Python dict literal"),
    "steam bad date": ("steam", lambda p: write_gzip(p / "s.json.gz",
                                                     "{'username': 'a', 'product_id': '1', "
                                                     "'date': 'Dec 17'}\n"),
                       "is not YYYY-MM-DD"),
    "bad timestamp": ("ml-1m", lambda p: write_text(p / "ratings.dat", "1::2::3::soon\n"),
                      "timestamp 'soon' is not an integer"),
    "unknown dataset": ("movielens", lambda p: write_text(p / "ratings.dat", ML_RATINGS),
                        "unknown dataset"),
}


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prepare.py: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_fails_cleanly(tmp_path, case):
    name, make_raw, expected = BAD_INPUTS[case]
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    result = run_prepare(name, make_raw(raw_dir), out=tmp_path / "out")
    assert_one_line_error(result, expected)
    assert files_under(tmp_path / "out") == []


def test_failed_run_keeps_earlier_output(tmp_path):
    out = tmp_path / "out"
    good = run_prepare("ml-1m", write_text(tmp_path / "ratings.dat", ML_RATINGS), out=out)
    assert good.returncode == 0
    bad = run_prepare("ml-1m", write_text(tmp_path / "bad.dat", ML_RATINGS + "1::2::3\n"), out=out)
    assert_one_line_error(bad, "line 9")
    assert files_under(out) == [out / "ml-1m" / "ml-1m.inter"]
    assert prepared(out, "ml-1m") == ML_EXPECTED


def test_usage_error_is_one_line(tmp_path):
    result = run_prepare("ml-1m", out=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# --check
# ---------------------------------------------------------------------------------------------


def test_check_rejects_a_zip_that_is_not_the_official_one(tmp_path):
    raw = write_ml_zip(tmp_path / "ml-1m.zip")
    result = run_prepare("ml-1m", raw, "--check", out=tmp_path / "out")
    assert_one_line_error(result, "differs from the official ml-1m.zip md5 "
                                  "c4d9eecfca2ab87c1945afe126590906")
    assert files_under(tmp_path / "out") == []


def test_check_notes_when_no_checksum_is_published(tmp_path):
    ratings = run_prepare("ml-1m", write_text(tmp_path / "ratings.dat", ML_RATINGS), "--check",
                          out=tmp_path / "a")
    assert ratings.returncode == 0 and "ml-1m.zip only" in ratings.stdout
    amazon = run_prepare("amazon-beauty", write_text(tmp_path / "r.csv", AMAZON_CSV), "--check",
                         out=tmp_path / "b")
    assert amazon.returncode == 0 and "no official checksum" in amazon.stdout


def test_md5_matches_hashlib(tmp_path):
    raw = write_ml_zip(tmp_path / "ml-1m.zip")
    assert prepare.md5_of(raw) == hashlib.md5(raw.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The 5-core statistics are RecBole's own filter
# ---------------------------------------------------------------------------------------------


def kcore_fixture_csv() -> str:
    """Skewed activity and popularity, so that removals cascade over several rounds; duplicate
    user-item pairs; a user id that pandas reads as missing ('NA'); a quoted id.

    Only user ids are made 'missing': when both user and item ids are, RecBole 1.2.1's
    _filter_nan_user_or_item drops the wrong item rows (it indexes by position with labels left
    by the user drop). Real data has no such item ids (ML-1M, KuaiRand and Steam items are numbers,
    Amazon's are ASINs); Steam usernames like 'NA' or 'null' do occur.
    """
    rng = random.Random(11)
    users = [f"U{n:03d}" for n in range(150)] + ["NA", "null", 'say "hi"']
    items = [f"I{n:03d}" for n in range(90)]
    weights = [1 / (1 + n) ** 0.9 for n in range(len(items))]
    rows = []
    for user in users:
        for _ in range(rng.choice([2, 3, 4, 5, 5, 6, 7, 9, 14])):
            item = rng.choices(items, weights)[0]
            rows.append((user, item))
    rows += [("null", "I001")] * 6 + [("NA", "I000")] * 6 + [('say "hi"', "I000")] * 6
    rng.shuffle(rows)
    lines = []
    for n, (user, item) in enumerate(rows):
        user_field = '"' + user.replace('"', '""') + '"' if '"' in user else user
        lines.append(f"{user_field},{item},{rng.randint(1, 5)}.0,{1_300_000_000 + n % 97 * 86400}")
    return "\n".join(lines) + "\n"


def recbole_dataset(data_path: Path, name: str, monkeypatch):
    pytest.importorskip("recbole")
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from pipeline import compat

    compat.apply()
    from recbole.config import Config
    from recbole.data import create_dataset

    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # RecBole's Config parses sys.argv
    config = Config(model="SASRec", dataset=name, config_dict={
        "data_path": str(data_path),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[5,inf)",
        "item_inter_num_interval": "[5,inf)",
        "train_neg_sample_args": None,
        "show_progress": False,
    })
    return create_dataset(config)


def test_kcore_statistics_equal_recbole_filtering(tmp_path, monkeypatch, capsys):
    raw = write_text(tmp_path / "ratings.csv", kcore_fixture_csv())
    prepare.prepare("amazon-kc", [raw], tmp_path)
    printed = capsys.readouterr().out

    rows = prepare_rows.Interactions(1)
    rows.extend(prepare_readers.read_amazon([raw]))
    users, items = rows.column("user_col"), rows.column("item_col")
    _, ours, na_rows = prepare_stats.dataset_stats(rows)
    kept = prepare_stats.kcore_mask(users, items, prepare_stats.recbole_loaded(rows))
    assert na_rows >= 12  # the 'NA' and 'null' users, whom RecBole drops on loading

    # The fixture must exercise the iteration: one round of bans is not the fixed point.
    loaded = prepare_stats.recbole_loaded(rows)
    one_round = loaded & ~(
        (np.bincount(users[loaded], minlength=len(rows.users)) < 5)[users]
        | (np.bincount(items[loaded], minlength=len(rows.items)) < 5)[items]
    )
    assert one_round.sum() != kept.sum()

    dataset = recbole_dataset(tmp_path, "amazon-kc", monkeypatch)
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (
        ours.users, ours.items, ours.interactions,
    )
    feat = dataset.inter_feat
    theirs = Counter(zip(
        dataset.id2token("user_id", feat["user_id"].to_numpy()).tolist(),
        dataset.id2token("item_id", feat["item_id"].to_numpy()).tolist(),
        feat["timestamp"].to_numpy().astype("int64").tolist(),
    ))
    user_tokens, item_tokens = rows.users.tokens(), rows.items.tokens()
    ticks = rows.column("ticks")
    mine = Counter(
        (user_tokens[users[i]], item_tokens[items[i]], int(ticks[i])) for i in np.flatnonzero(kept)
    )
    assert mine == theirs
    assert any(user == 'say "hi"' for user, _, _ in theirs)  # a quoted id read back intact
    assert f"{ours.interactions:,}" in printed


# ---------------------------------------------------------------------------------------------
# Real data: reproduce the shared atomic files from raw-format copies of them
# ---------------------------------------------------------------------------------------------


def shared_lines(name: str) -> tuple[str, list[str]]:
    path = SHARED / name / f"{name}.inter"
    if not path.exists():
        pytest.skip(f"{path} is not here (only the project's own machines have ../shared)")
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    return header, rows


def test_reproduces_ml_1m_half(tmp_path):
    """ml-1m-half.inter holds the exact ratings.dat lines of users 1..2999, in ratings.dat order.
    Rebuilt as ratings.dat, prepare.py must give back the same rows, ordered by user then time."""
    header, rows = shared_lines("ml-1m-half")
    fields = [row.split("\t") for row in rows]
    raw = write_text(tmp_path / "ratings.dat", "".join("::".join(f) + "\n" for f in fields))
    result = run_prepare("ml-1m", raw, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    order = sorted(range(len(rows)), key=lambda n: (int(fields[n][0]), int(fields[n][3])))  # stable
    expected = header + "\n" + "".join(rows[n] + "\n" for n in order)
    got = prepared(tmp_path / "out", "ml-1m")
    assert got == expected
    assert Counter(got.splitlines()[1:]) == Counter(rows)


def test_reproduces_amazon_sports_from_ratings_csv(tmp_path):
    """amazon-sports.inter is already in user/time order;
    as a ratings CSV it must come back as is."""
    header, rows = shared_lines("amazon-sports")
    csv_text = "".join(f"{u},{i},5.0,{t}\n" for u, i, t in (row.split("\t") for row in rows))
    raw = write_text(tmp_path / "ratings_Sports_and_Outdoors.csv", csv_text)
    result = run_prepare("amazon-sports", raw, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    got = [line.split("\t")
           for line in prepared(tmp_path / "out", "amazon-sports").splitlines()[1:]]
    assert ["\t".join((u, i, t)) for u, i, _, t in got] == rows
    assert "35,598" in result.stdout and "296,337" in result.stdout


def test_streams_a_million_ratings_in_bounded_memory(tmp_path):
    """Peak memory grows by tens of bytes per row, not by the size of the whole file in
    Python objects.

    Converting 250k and then 1M generated ML-1M ratings: the extra 750k rows may add at most
    100 bytes each to the child's peak RSS (reading the file into Python lists would add several
    hundred per row).
    """
    spec = importlib.util.spec_from_file_location("prepare_1m",
                                                  REPO_ROOT / "bench" / "prepare_1m.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["prepare_1m"] = bench  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    peaks = {}
    for rows in (250_000, 1_000_000):
        raw = tmp_path / f"ratings_{rows}.dat"
        bench.generate_ratings(raw, rows=rows, users=6040, items=3706, seed=0)
        run = bench.measure([sys.executable, str(SCRIPT), "ml-1m", str(raw),
                             "--out", str(tmp_path / str(rows))])
        assert run.returncode == 0, run.output
        lines = sum(1 for _ in open(tmp_path / str(rows) / "ml-1m" / "ml-1m.inter"))
        assert lines == rows + 1
        peaks[rows] = run.peak_rss_mib * 2**20
    assert (peaks[1_000_000] - peaks[250_000]) / 750_000 < 100


def test_missing_id_tokens_are_those_pandas_reads_as_missing():
    """The preparer counts the rows RecBole drops without importing pandas; its list of tokens
    must be the one pandas (and so RecBole's loader) uses."""
    from pandas._libs.parsers import STR_NA_VALUES

    assert prepare_stats.PANDAS_NA_STRINGS == frozenset(STR_NA_VALUES)
