"""One process or a `torchrun` process group: who this process is and the collectives training
needs (each a no-op in a single process)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistributedEnv:
        """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them: one process."""
        environ = os.environ if environ is None else environ
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return cls()
        return cls(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
        )

    @classmethod
    def current(cls) -> DistributedEnv:
        """This process in the joined process group (one process when none is joined)."""
        if not dist.is_initialized():
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def device_for(env: DistributedEnv) -> torch.device:
    # Never assume cuda:0: each process drives the GPU of its LOCAL_RANK.
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic runs natively here: a GPU with bf16, or a CPU with AVX512-BF16 /
    AMX (oneDNN's check). Elsewhere bf16 autocast is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without the check
            return False
    return False


@contextlib.contextmanager
def distributed_session() -> Iterator[DistributedEnv]:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) for the block's duration.

    A group that is already initialised is used and left alone.
    """
    env = DistributedEnv.from_environ()
    owned = False
    if env.world_size > 1 and not dist.is_initialized():
        device = device_for(env)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owned = True
    if dist.is_initialized():
        env = DistributedEnv(dist.get_rank(), dist.get_world_size(), env.local_rank)
    try:
        yield env
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's value, in rank order."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks, in float64."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
