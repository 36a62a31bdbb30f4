"""Which process of a data-parallel job this is: its rank, the job's size and its local rank, from
``torch.distributed`` or the launcher's environment."""

from __future__ import annotations

import os
import sys

__all__ = ["distributed_defaults", "local_rank"]


def local_rank() -> tuple[int, int]:
    """``(LOCAL_RANK, LOCAL_WORLD_SIZE)`` as launchers such as ``torchrun`` set them: this process's
    rank among those on its machine (0 when unset), and their number — 1 when unset or not above
    the rank: the process then works alone."""
    try:
        rank = max(0, int(os.environ.get("LOCAL_RANK", "0")))
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
    return rank, world if world > rank else 1


def distributed_defaults() -> tuple[int, int, int]:
    """``(shard_id, num_shards, device_id)`` of this process in a data-parallel job.

    From an initialised ``torch.distributed`` process group (rank, world size), else from the
    ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables that ``torchrun`` and most launchers set,
    else ``(0, 1, 0)``. ``device_id`` is the local rank, so each rank binds its own GPU. torch is
    never imported here: only a ``torch.distributed`` the program already uses is asked.
    """
    env = os.environ
    device = local_rank()[0]
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), device
    return 0, 1, device
