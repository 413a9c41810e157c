"""torchrun support: the few collective steps a run needs.

Groups of tensors are independent, so ranks share nothing but the store directory and the
preallocated output shards: rank 0 lays those out and records the store's pending change, every
rank writes its own groups, and rank 0 commits the store and finalises after a barrier (which
groups a rank takes: plan.assign). Outside torchrun every function here is a no-op for rank 0
of 1.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .envvars import master_address, torchrun_env
from .errors import RelexError

log = logging.getLogger(__name__)

# How long a rank waits for the others to join. torchrun starts every rank of a job within
# seconds of each other (and stops the job when one fails), so a longer wait means a rank that
# will never come: WORLD_SIZE and RANK left in the environment of a single process, say.
JOIN_TIMEOUT_S = 300.0
# After this long alone a rank says what it waits for (a stray WORLD_SIZE looks like a hang).
JOIN_NOTICE_S = 5.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device_name: str) -> Ranks:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK).

    On CUDA each rank is bound to GPU LOCAL_RANK before the process group exists, and the group
    is told so (device_id): the first collective then runs on that GPU, not global_rank % GPUs.
    """
    found = torchrun_env()
    if found is None:
        return Ranks()
    ranks = Ranks(*found)
    if device_name.startswith("cuda:"):
        raise RelexError(
            f"--device {device_name} under torchrun: each rank uses GPU LOCAL_RANK; pass "
            "--device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if not dist.is_initialized():
        address, port = master_address()
        try:
            socket.getaddrinfo(address, port)
        except (OSError, UnicodeError) as exc:
            raise RelexError(
                f"MASTER_ADDR {address!r} does not resolve ({exc}); give the address of the "
                "rank 0 node (torchrun's --master-addr / --rdzv-endpoint)"
            ) from None
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        options: dict = {"timeout": datetime.timedelta(hours=2)}  # rank 0 may finalise long
        if use_cuda:
            if ranks.local_rank >= torch.cuda.device_count():
                raise RelexError(
                    f"LOCAL_RANK {ranks.local_rank} has no GPU ({torch.cuda.device_count()} "
                    "visible); start fewer processes per node or make more GPUs visible"
                )
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                options["device_id"] = device  # torch >= 2.3
        _join(ranks, address, port, backend="nccl" if use_cuda else "gloo", **options)
    return ranks


def _join(ranks: Ranks, address: str, port: int, **options) -> None:
    """dist.init_process_group, waited for at most JOIN_TIMEOUT_S and stoppable with Ctrl-C.

    torch's wait for the other ranks is one C++ call that lasts the group's whole timeout (two
    hours here, for collectives) and does not see signals; it runs on a helper thread, which a
    rank that gives up leaves behind as it exits.
    """
    failure: list[BaseException] = []

    def join() -> None:
        try:
            dist.init_process_group(**options)
        except BaseException as exc:  # noqa: BLE001 (re-raised on the calling thread)
            failure.append(exc)

    fix = "launch every rank with torchrun, or unset WORLD_SIZE, RANK and LOCAL_RANK for a " \
          "single process"
    helper = threading.Thread(target=join, name="relex-join", daemon=True)
    started = time.monotonic()
    helper.start()
    helper.join(JOIN_NOTICE_S)
    if helper.is_alive():
        log.warning("rank %d of %d: waiting for the other ranks at %s:%d (at most %.0f s; "
                    "Ctrl-C stops); %s", ranks.rank, ranks.world_size, address, port,
                    JOIN_TIMEOUT_S, fix)
    while helper.is_alive() and time.monotonic() - started < JOIN_TIMEOUT_S:
        helper.join(0.25)  # short waits, so that Ctrl-C reaches this thread
    if helper.is_alive():
        raise RelexError(
            f"rank {ranks.rank} of {ranks.world_size}: the other ranks did not join at "
            f"{address}:{port} within {JOIN_TIMEOUT_S:.0f} s; {fix}"
        )
    if failure:
        exc = failure[0]
        # a port in use, a refused connection, a timeout; gloo's RuntimeError for a bad
        # GLOO_SOCKET_IFNAME or GLOO_DEVICE_TRANSPORT
        if isinstance(exc, (dist.DistError, RuntimeError)):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise RelexError(f"rank {ranks.rank} of {ranks.world_size}: could not join the job "
                             f"at {address}:{port} ({first}); check MASTER_ADDR and "
                             f"MASTER_PORT (a free port) and any GLOO_* or NCCL_* variable, "
                             f"or {fix}") from None
        raise exc


def device_for(device_name: str, ranks: Ranks) -> str:
    """Each rank picks its own GPU (LOCAL_RANK) when on CUDA."""
    if ranks.distributed and device_name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device_name


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def broadcast(value, ranks: Ranks):
    """Rank 0's value, on every rank (a small picklable object)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, ranks: Ranks) -> list:
    """Every rank's value (a small picklable object), on every rank."""
    if not ranks.distributed:
        return [value]
    boxes: list = [None] * ranks.world_size
    dist.all_gather_object(boxes, value)
    return boxes


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
