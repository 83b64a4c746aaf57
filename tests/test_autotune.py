"""pipeline/autotune.py: kernel choices restored into autotuners and saved for the next process."""

import json

import pytest

from pipeline import autotune


class Config:
    """Stands in for triton.Config: what the module reads is its text and its identity."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


class Tuner:
    def __init__(self, *texts):
        self.configs = [Config(t) for t in texts]
        self.cache = {}


@pytest.fixture
def tuners(monkeypatch, tmp_path):
    found = {"ssd_bmm._bmm_chunk_fwd_kernel": Tuner("M: 64, num_warps: 4", "M: 128, num_warps: 8"),
             "ssd_state_passing._state_passing_fwd_kernel": Tuner("BLOCK: 256", "BLOCK: 512")}
    monkeypatch.setattr(autotune, "_autotuners", lambda: found)
    monkeypatch.setattr(autotune, "_gpu", lambda: "Some GPU")
    monkeypatch.setattr(autotune, "_restored", {})
    monkeypatch.setattr(autotune, "SHIPPED", tmp_path / "shipped.json")
    monkeypatch.setenv("TIM4REC_AUTOTUNE_CACHE", str(tmp_path / "user.json"))
    return found


def test_saved_choices_come_back_as_the_kernels_own_configs(tuners, tmp_path):
    bmm = tuners["ssd_bmm._bmm_chunk_fwd_kernel"]
    bmm.cache[(32, 32, False, "torch.float32")] = bmm.configs[1]
    assert autotune.save() == 1
    assert autotune.save() == 0  # nothing new since
    saved = json.loads((tmp_path / "user.json").read_text())
    assert saved == {"Some GPU": {"ssd_bmm._bmm_chunk_fwd_kernel": {
        '[32, 32, false, "torch.float32"]': "M: 128, num_warps: 8"}}}

    bmm.cache.clear()
    autotune._restored.clear()
    assert autotune.restore() == 1
    assert bmm.cache[(32, 32, False, "torch.float32")] is bmm.configs[1]  # keeps its pre-hooks


def test_user_choices_win_over_shipped_ones_and_stale_entries_are_skipped(tuners, tmp_path):
    key = "[1024]"
    name = "ssd_state_passing._state_passing_fwd_kernel"
    (tmp_path / "shipped.json").write_text(json.dumps({"Some GPU": {name: {
        key: "BLOCK: 256", "[64]": "BLOCK: 4096"}}}))  # "[64]": not a candidate any more
    (tmp_path / "user.json").write_text(json.dumps({"Some GPU": {name: {key: "BLOCK: 512"}},
                                                    "Other GPU": {name: {"[8]": "BLOCK: 256"}}}))
    assert autotune.restore() == 1  # the user's choice for [1024]; not the stale [64], not [8]
    tuner = tuners[name]
    assert tuner.cache == {(1024,): tuner.configs[1]}
    assert autotune.save() == 0  # restored choices are not written back


def test_off_reads_and_writes_nothing(tuners, tmp_path, monkeypatch):
    monkeypatch.setenv("TIM4REC_AUTOTUNE_CACHE", "off")
    assert autotune.cache_file() is None
    bmm = tuners["ssd_bmm._bmm_chunk_fwd_kernel"]
    bmm.cache[(16,)] = bmm.configs[0]
    assert autotune.save() == 0
    assert not list(tmp_path.iterdir())


def test_a_torn_cache_file_is_ignored_with_a_warning(tuners, tmp_path, caplog):
    (tmp_path / "user.json").write_text("{not json")
    assert autotune.restore() == 0
    assert "ignoring the autotune cache" in caplog.text


def test_without_shipped_choices_only_the_users_come_back(tuners, tmp_path, monkeypatch, caplog):
    name = "ssd_state_passing._state_passing_fwd_kernel"
    shipped = {"Some GPU": {name: {"[1024]": "BLOCK: 256"}}}
    (tmp_path / "shipped.json").write_text(json.dumps(shipped))
    (tmp_path / "user.json").write_text(json.dumps({"Some GPU": {name: {"[64]": "BLOCK: 512"}}}))
    monkeypatch.setattr(autotune, "SHIPPED", None)
    assert autotune.restore() == 1
    assert tuners[name].cache == {(64,): tuners[name].configs[1]}
    assert "ignoring" not in caplog.text
