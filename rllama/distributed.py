"""Data-parallel training across processes: each process acts in its own envs; gradients are averaged.

Launch the same training script once per process; rllama notices the launcher's environment
(``WORLD_SIZE`` > 1) when the agent is built and joins the process group through Hugging Face
Accelerate (gloo on CPU, NCCL on GPUs):

.. code-block:: bash

    torchrun --nproc_per_node 2 train.py              # CPU processes (gloo)
    accelerate launch --multi_gpu train.py            # one process per GPU

What each process does differently, and what stays identical:

- Every process starts from rank 0's adapter and head weights (broadcast when the algorithm is
  built) and steps its own envs, with env seeds and action sampling offset by its rank.
- Updates happen in lockstep: after each finished-episode check, the processes agree (one small
  all-reduce) and update only when every process has a full batch. Inside an update they agree
  on the number of minibatches and on early stopping, and average every gradient before the
  optimizer step, so all processes end each update with identical weights.
- A process that has played its episodes keeps answering these checks until all have finished,
  so processes with different episode lengths never deadlock.

Statistics returned by updates are the process's own (its rollouts, its minibatch losses).
Evaluation runs in each process independently, without communication.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

__all__ = ["DataParallel", "current", "setup"]


class DataParallel:
    """Collective operations rllama needs, over the default ``torch.distributed`` process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size})"

    def broadcast_parameters(self, params: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``params`` with process ``src``'s values."""
        params = list(params)
        if not params:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        self._dist.broadcast(flat, src=src)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over processes (missing gradients count as 0)."""
        params = list(params)
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        self._dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            g = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += p.numel()

    def sum(self, values: Iterable[float]) -> list[float]:
        """Element-wise sum over processes."""
        t = torch.tensor(list(values), dtype=torch.float64)
        self._dist.all_reduce(t)
        return t.tolist()

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over processes."""
        t = torch.tensor([int(value)], dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process."""
        return self.sum([float(flag)])[0] > 0


def current() -> DataParallel | None:
    """The data-parallel context if a process group of more than one process is running, else ``None``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel()
    return None


def setup() -> DataParallel | None:
    """Join the process group when launched by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1).

    Returns the data-parallel context, or ``None`` in a single process. Called by the agent; calling
    it again is harmless.
    """
    context = current()
    if context is not None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return context
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())  # initialises torch.distributed (gloo / NCCL)
    return current()
