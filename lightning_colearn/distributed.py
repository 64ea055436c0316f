"""Members across processes: which rank trains which member, and the collectives between ranks.

Under one of Lightning's DDP strategies (``ddp``, ``ddp_spawn``, several
nodes) a :class:`~lightning_colearn.CohortModule` shards its *members*, not
its data: member ``i`` trains on rank ``i % W`` (:func:`member_owner`), and
every rank holds the whole cohort and sees every training batch, so each
member sees exactly the batches it sees in one process. DDP's own gradient
all-reduce is switched off: the members share no parameters, so there is
nothing to average, and each rank's gradients are its own members'.

A rank's copies of the members other ranks train go stale as those train.
Communication rules bring them up to date with collectives through
Lightning's strategy, only when they need them:

* :func:`sync_members`: chosen members' parameters and buffers, as raw bytes,
  in one ``all_gather`` (exact whatever the dtypes);
* :func:`gather_values`: one number per member, computed by the rank that
  trains it (a loss, a vote score), in one ``all_reduce``;
* ``strategy.broadcast``: a decision taken once, on rank 0 (votes, winners,
  moves, blocks), so that no rank can drift from the others;
* :func:`gather_objects`: the members' optimizer states, for a checkpoint.

Examples:
    >>> member_owner(5, world_size=2), owned_members(5, rank=1, world_size=2)
    (1, [1, 3])
    >>> a, b = torch.arange(3.0), torch.tensor([7, 8])
    >>> flat = pack([a, b])
    >>> flat.dtype, flat.numel()
    (torch.uint8, 28)
    >>> x, y = torch.zeros(3), torch.zeros(2, dtype=torch.long)
    >>> unpack_into_(flat, [x, y]); x, y
    (tensor([0., 1., 2.]), tensor([7, 8]))
"""

from __future__ import annotations

import atexit
import datetime

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["gather_objects", "gather_values", "member_owner", "owned_members", "pack", "sync_members", "unpack_into_"]


def member_owner(member: int, world_size: int) -> int:
    """The rank that trains ``member``: members are dealt round-robin (``member % world_size``)."""
    return member % world_size


def owned_members(size: int, rank: int, world_size: int) -> list[int]:
    """The members rank ``rank`` trains, of a cohort of ``size``."""
    return list(range(rank, size, world_size))


def pack(tensors: Sequence[Tensor]) -> Tensor:
    """The bytes of ``tensors``, one after the other, as one flat ``uint8`` tensor (no dtype conversion)."""
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


@torch.no_grad()
def unpack_into_(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy the bytes :func:`pack` made back into ``tensors`` (same shapes and dtypes), in place."""
    offset = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        # clone: a slice at an odd offset may not be aligned for t's dtype
        t.copy_(flat[offset:offset + n].clone().view(t.dtype).view(t.shape))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"packed member state has {flat.numel()} bytes, the member's tensors take {offset}")


def _nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sync_members(strategy: Any, member_tensors: Callable[[int], list[Tensor]], members: Sequence[int],
                 rank: int, world_size: int) -> None:
    """Give every rank the owner's copy of each of ``members``: one ``all_gather`` of their bytes.

    Every rank must call it with the same ``members`` (a collective).
    ``member_tensors(i)`` returns member ``i``'s live parameters and buffers.
    """
    members = sorted(set(members))
    if world_size == 1 or not members:
        return
    rows = [[m for m in members if member_owner(m, world_size) == r] for r in range(world_size)]
    tensors = {m: member_tensors(m) for m in members}
    sizes = {m: _nbytes(t) for m, t in tensors.items()}
    device = tensors[members[0]][0].device
    mine = torch.zeros(max(len(r) for r in rows), max(sizes.values()), dtype=torch.uint8, device=device)
    for j, m in enumerate(rows[rank]):
        mine[j, :sizes[m]] = pack(tensors[m])
    gathered = strategy.all_gather(mine)  # [world_size, rows, bytes]
    for r, owned in enumerate(rows):
        if r != rank:
            for j, m in enumerate(owned):
                unpack_into_(gathered[r, j, :sizes[m]], tensors[m])


def gather_values(strategy: Any, values: dict[int, float], members: Sequence[int], device: torch.device | None = None) -> list[float]:
    """``[value of m for m in members]`` on every rank, where each rank knows the values of the members in ``values``.

    Exactly one rank must know each member's value (NaN and inf pass through). One ``all_reduce``.
    """
    buffer = torch.zeros(2, len(members), dtype=torch.float64, device=device)
    for k, m in enumerate(members):
        if m in values:
            buffer[0, k], buffer[1, k] = float(values[m]), 1.0
    total = strategy.reduce(buffer, reduce_op="sum")
    counts = total[1].tolist()
    if any(c != 1 for c in counts):
        missing = [m for m, c in zip(members, counts) if c != 1]
        raise RuntimeError(f"gather_values: members {missing} were computed by {counts} ranks, expected exactly one each")
    return total[0].tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


_release_registered = False


def release_process_group_at_exit(timeout: float = 60.0) -> None:
    """Have this process leave its process group together with the others when it exits (once per process).

    Lightning leaves the group to interpreter shutdown, where each rank tears down
    its Gloo connections on its own; one rank exiting while another still used
    them ended in ``terminate called without an active exception`` (SIGABRT) after
    a finished run. At exit, this waits at a barrier for the other ranks (at most
    ``timeout`` seconds, so a rank that died cannot hold the others) and then
    destroys the group explicitly.
    """
    global _release_registered
    if not _release_registered:
        atexit.register(_release_process_group, timeout)
        _release_registered = True


def _release_process_group(timeout: float) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout))
        else:
            dist.barrier()
    except Exception:  # another rank is gone (it failed, or left first): leave anyway
        pass
    try:
        dist.destroy_process_group()
    except Exception:
        pass
