"""Accelerator memory that a service gives up while another one uses the GPU (colocated placement), and
what each service reports about its memory.

`StorageSwap` frees the memory behind a set of tensors and brings it back *in place*: each storage is
resized to zero bytes (after an optional copy to host memory) and later resized back and refilled. Every
tensor object and every view stays valid (FSDP's padded shards and the DTensors over them, the optimizer's
references, an engine's parameter dict), which moving tensors with `.to()` would not guarantee; FSDP
frees its unsharded parameters the same way.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor

GIB = float(1 << 30)


class StorageSwap:
    """The storages under `tensors` (each once, however many tensors view it; DTensors by their local
    shard); those on `device` only.

    `release(keep=True)` copies them to host memory (pinned, when they are on a GPU) and frees them;
    `release(keep=False)` frees them without a copy (what they held is lost); `restore()` allocates them
    again and, if they were kept, refills them. Both are idempotent.
    """

    def __init__(self, tensors: Iterable[torch.Tensor], device: torch.device):
        self.device = device
        seen: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            if isinstance(t, DTensor):   # a shard (parameter, gradient, optimizer state): its local tensor
                t = t.to_local()
            if t is None or t.device != device:
                continue
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = storage
        self.storages = list(seen.values())
        self.nbytes = [s.nbytes() for s in self.storages]
        self._host: list[torch.Tensor] | None = None
        self.released = False

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes)

    def release(self, keep: bool = True) -> None:
        if self.released:
            if not keep:
                self._host = None   # a deeper release: drop the host copy too
            return
        pin = self.device.type == "cuda"
        if keep:
            self._host = []
            for storage, n in zip(self.storages, self.nbytes):
                host = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
                host.copy_(byte_view(storage, n), non_blocking=pin)
                self._host.append(host)
            if pin:
                torch.cuda.synchronize(self.device)
        for storage in self.storages:
            if not storage.resizable():
                raise RuntimeError("a storage to release is not resizable (memory-mapped weights?); clone the "
                                   "tensors into owned memory first")
            storage.resize_(0)
        self.released = True

    def restore(self) -> bool:
        """Allocates the storages again; returns whether their content came back (False after keep=False)."""
        if not self.released:
            return True
        for storage, n in zip(self.storages, self.nbytes):
            storage.resize_(n)
        kept = self._host is not None
        if kept:
            pin = self.device.type == "cuda"
            for storage, n, host in zip(self.storages, self.nbytes, self._host):
                byte_view(storage, n).copy_(host, non_blocking=pin)
            if pin:
                torch.cuda.synchronize(self.device)
        self._host, self.released = None, False
        return kept


def byte_view(storage: torch.UntypedStorage, n: int) -> torch.Tensor:
    """The first `n` bytes of `storage` as a uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (n,), (1,))


def owned(params: Iterable[torch.nn.Parameter]) -> None:
    """Copies parameters whose storage cannot be resized (e.g. memory-mapped from a checkpoint) into owned
    memory, so that a StorageSwap over them can release them."""
    for p in params:
        if p.numel() and not p.untyped_storage().resizable():
            p.data = p.data.clone()


def free_cached(device: torch.device) -> None:
    """Hands what this process's allocator caches back to the driver, for the other processes on the GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()


def memory_report(device: torch.device) -> dict[str, float]:
    """This process's and the whole GPU's memory now, in GiB, and this process's peak since the previous
    report (whose counter this resets). Zeros off a GPU."""
    if device.type != "cuda":
        return {"device_used_gib": 0.0, "device_total_gib": 0.0, "allocated_gib": 0.0, "reserved_gib": 0.0,
                "peak_allocated_gib": 0.0}
    free, total = torch.cuda.mem_get_info(device)
    out = {"device_used_gib": (total - free) / GIB, "device_total_gib": total / GIB,
           "allocated_gib": torch.cuda.memory_allocated(device) / GIB,
           "reserved_gib": torch.cuda.memory_reserved(device) / GIB,
           "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB}
    torch.cuda.reset_peak_memory_stats(device)
    return out
