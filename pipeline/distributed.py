"""Data-parallel training over several processes with torch.distributed (NCCL on GPUs, gloo on CPU).

A process is a worker of a distributed run when the launcher's variables are set (``WORLD_SIZE``
> 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): ``torchrun`` sets them on each
machine, and ``python run.py --nproc=N`` sets them for N processes of its own (:func:`spawn`).

RecBole 1.2.1 has a distributed mode, but it is wired to NCCL, averages per-rank metrics rounded
to four decimals over padded user lists, and lets every rank load the best checkpoint while rank 0
may still be writing it. This project keeps RecBole in its single-process mode and does the
distributed parts itself:

- training: the training loader is rebuilt with a ``DistributedSampler`` seeded with the run's seed
  (:func:`shard_train_loader`): every epoch is one permutation, split between the ranks, and
  ``train_batch_size`` stays the global batch (each rank takes ``train_batch_size / N``);
- evaluation: each rank scores every N-th batch, and the per-user results are gathered before
  any metric is computed (:func:`gather_rows`), so the metrics equal a single process's;
- outputs: only rank 0 writes the log, TensorBoard, the results file and checkpoints; the others
  wait at a barrier after each save before they read a checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import socket

from pipeline.errors import UserError

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True in a worker of a distributed launch (torchrun, or :func:`spawn`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def setup(config) -> None:
    """Join the process group of this launch and point the run's config at this rank's device.

    NCCL and ``cuda:LOCAL_RANK`` when the run may use a GPU and one is there, else gloo on the CPU.
    """
    import torch
    import torch.distributed as dist

    missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
    if missing:
        raise RuntimeError(f"distributed launch without {', '.join(missing)} set")
    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpu = bool(config["use_gpu"]) and torch.cuda.is_available()
    if on_gpu:
        if local_rank >= torch.cuda.device_count():
            error = UserError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} "
                              f"visible (gpu_id {config['gpu_id']!r})")
            error.every_rank = True  # only this rank knows: it must say so itself
            raise error
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method="env://")
    config["device"] = device
    config["world_size"] = dist.get_world_size()
    if dist.get_rank() != 0:
        config["show_progress"] = False


def shard_train_loader(config, loader):
    """The training loader again, each rank reading its share of every epoch's permutation.

    RecBole builds a ``DistributedSampler`` when its config says distributed; the flag is raised
    only while this loader is built, so nothing else of RecBole's distributed mode runs.
    """
    config["single_spec"] = False
    try:
        sharded = type(loader)(config, loader._dataset, loader._sampler, shuffle=loader.shuffle)
    finally:
        config["single_spec"] = True
    sharded.sampler.seed = int(config["seed"])  # DistributedSampler's own default seed is 0
    return sharded


def broadcast(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    import torch.distributed as dist

    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(tensor):
    """The rows of ``tensor`` from every rank, concatenated in rank order
    (None: this rank has none)."""
    import torch
    import torch.distributed as dist

    parts = [None] * world_size()
    dist.all_gather_object(parts, None if tensor is None else tensor.cpu())
    parts = [p for p in parts if p is not None]
    return torch.cat(parts) if parts else None


def all_sum(tensor):
    """``tensor`` summed over the ranks (in place)."""
    import torch.distributed as dist

    if active():
        dist.all_reduce(tensor)
    return tensor


def parameters_digest(model) -> str:
    """A hash of every parameter's bytes: equal on two ranks only if their weights are identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def gather_digests(model) -> list[str]:
    """:func:`parameters_digest` of every rank's model, in rank order."""
    import torch.distributed as dist

    digests = [None] * world_size()
    dist.all_gather_object(digests, parameters_digest(model))
    return digests


def backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if active() else "none"


def shutdown() -> None:
    """Leave the process group (a no-op outside a distributed run).

    After a successful run every rank comes here from a barrier, so that no rank leaves while its
    peer still uses the connection: the suspected cause of one abort at exit ("terminate called
    without an active exception", gloo, a loaded 2-core machine), which 25 runs did not
    reproduce."""
    import torch.distributed as dist

    if active():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, nproc: int, port: int, target, args) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # Each process would take a thread per core: N processes would oversubscribe the cores N
        # times, and the batches they collate on the CPU would wait on each other's threads.
        torch.set_num_threads(max(1, torch.get_num_threads() // nproc))
    target(*args)


def spawn(nproc: int, target, args=()) -> int:
    """Run ``target(*args)`` in ``nproc`` fresh processes set up as one distributed launch.

    Returns 0, or the exit status of the first process that failed (the others are stopped).
    """
    import logging

    import torch.multiprocessing as mp

    # When one process fails, torch stops the others and logs each stop: the failing process has
    # already said what went wrong, in one line.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    context = mp.start_processes(_worker, args=(nproc, free_port(), target, args), nprocs=nproc,
                                 join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as error:
        return error.exit_code or 1
    except mp.ProcessRaisedException:
        return 1
    return 0
