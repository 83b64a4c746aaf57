"""Distributed training on the CPU (gloo): two processes, by ``run.py --nproc=2`` and by torchrun
as two "machines" on loopback. The replicas must end with identical weights, and the metrics a
distributed run reports must equal a single-process evaluation of its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import ROOT
from pipeline.workflow import evaluate
from tests.conftest import for_model

TINY = {"dataset": "tiny", "hidden_size": 16, "d_state": 8, "head_dim": 8, "chunk_size": 4,
        "MAX_ITEM_LIST_LENGTH": 10, "topk": "[5,10]", "train_batch_size": 64, "epochs": 2,
        "show_progress": False, "use_gpu": False, "state": "ERROR"}


def settings(data_path, folder, model="TiM4Rec", **changes):
    """--key=value arguments of a tiny run of ``model`` on ``data_path``
    writing under ``folder``."""
    values = {**for_model(model, TINY), "data_path": data_path,
              "checkpoint_dir": folder / "saved", "log_dir": folder / "log",
              "tensorboard_dir": folder / "tb", **changes}
    return [f"--{key}={value}" for key, value in values.items()]


def launch(cmd, timeout=300):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def results(folder) -> dict:
    (path,) = (folder / "log").rglob("*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def two_processes(tiny_data_path, tmp_path_factory):
    """Results of ``run.py --nproc=2``, evaluating 2 users a batch (20 batches, split by rank)."""
    folder = tmp_path_factory.mktemp("nproc2")
    done = launch([sys.executable, "run.py", "--nproc=2",
                   *settings(tiny_data_path, folder, eval_batch_size=64)])
    assert done.returncode == 0, done.stderr[-3000:]
    return results(folder)


def test_two_processes_end_with_identical_weights(two_processes):
    assert two_processes["processes"] == 2
    digests = two_processes["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_distributed_metrics_equal_a_single_process_evaluation(two_processes, tiny_data_path):
    single = evaluate(two_processes["checkpoint"], {
        "data_path": str(tiny_data_path), "show_progress": False, "eval_batch_size": 4096},
        quiet=True)
    for split, reported in (("test_result", two_processes["test_result"]),
                            ("valid_result", two_processes["best_valid_result"])):
        assert single[split].keys() == reported.keys()
        for key, value in single[split].items():
            assert reported[key] == pytest.approx(value, abs=1e-4), (split, key)


def test_torchrun_two_nodes_on_loopback_give_the_same_run(two_processes, tiny_data_path,
                                                          tmp_path):
    """2 machines x 1 process through torchrun's static rendezvous, evaluating in one batch (so
    rank 1 scores nothing): the same weights and the same metrics as ``--nproc=2``."""
    from pipeline.distributed import free_port

    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}", "run.py",
         *settings(tiny_data_path, tmp_path, eval_batch_size=4096)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out[-3000:]
    run = results(tmp_path)
    assert run["replica_digests"] == two_processes["replica_digests"]
    assert run["test_result"] == pytest.approx(two_processes["test_result"], abs=1e-4)


def test_distributed_training_resumes(two_processes, tiny_data_path, tmp_path):
    import torch

    from pipeline import checkpoint

    source = two_processes["checkpoint"]
    before = open(source, "rb").read()
    done = launch([sys.executable, "run.py", "--nproc=2",
                   *settings(tiny_data_path, tmp_path, checkpoint_path=source, epochs=4)])
    assert done.returncode == 0, done.stderr[-3000:]
    run = results(tmp_path)
    after = checkpoint.resume_state(torch.load(source, weights_only=True))["epoch"] + 1
    assert [e["epoch"] for e in run["epochs"]] == list(range(after, 4))
    assert run["checkpoint"] != source and run["resumed_from"] == source
    assert open(source, "rb").read() == before  # resuming never writes to its source
    assert run["replica_digests"][0] == run["replica_digests"][1]


def test_an_error_inside_the_processes_is_one_line(tiny_data_path, tmp_path):
    done = launch([sys.executable, "run.py", "--nproc=2",
                   *settings(tiny_data_path, tmp_path, topk="[10,100]")])
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: topk"), done.stderr
    assert not (tmp_path / "log").exists() and not (tmp_path / "saved").exists()


@pytest.mark.parametrize("model", ["SASRec", "BERT4Rec", "GRU4Rec", "Caser", "TiSASRec", "LRURec",
                                   "Mamba4Rec", "SSD4Rec"])
def test_every_baseline_trains_on_two_processes(model, tiny_data_path, tmp_path):
    if model == "Mamba4Rec":
        pytest.importorskip("mambapy", reason="Mamba4Rec's torch backend needs mambapy")
    done = launch([sys.executable, "run.py", "--nproc=2", f"--model={model}",
                   *settings(tiny_data_path, tmp_path, model, epochs=1)])
    assert done.returncode == 0, done.stderr[-3000:]
    run = results(tmp_path)
    assert run["model"] == model and run["processes"] == 2
    assert run["replica_digests"][0] == run["replica_digests"][1]


@pytest.mark.skipif(not __import__("torch").cuda.is_available()
                    or __import__("torch").cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_with_the_captured_step_train_and_exit(tiny_data_path, tmp_path):
    """NCCL, each rank's step (with DDP's all-reduce) replayed as a CUDA graph after DDP's eleven
    warm-up steps: the run must end (the graph is released before the process group), with
    identical replicas."""
    done = launch([sys.executable, "run.py", "--nproc=2",
                   *settings(tiny_data_path, tmp_path, use_gpu=True, cuda_graph=True,
                             ssd_backend="torch", train_batch_size=16, epochs=3)], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = results(tmp_path)["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
