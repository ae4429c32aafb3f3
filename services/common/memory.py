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
    again and, if they were kept, refills them. Both are idempotent. The host copy's buffers stay allocated
    for the next release (pinning gigabytes of host memory costs more than copying them); a release
    without keep frees them.
    """

    def __init__(self, tensors: Iterable[torch.Tensor], device: torch.device):
        self.device = device
        self.storages = _storages(tensors, device)
        self.nbytes = [s.nbytes() for s in self.storages]
        self._host: list[torch.Tensor] | None = None
        self.released = self._kept = False

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes)

    def covers(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether `tensors` (none released) have exactly this swap's storages, e.g. once an optimizer
        made its state they have more."""
        mine = [(s.data_ptr(), n) for s, n in zip(self.storages, self.nbytes)]
        return not self.released and [(s.data_ptr(), s.nbytes()) for s in _storages(tensors, self.device)] == mine

    def release(self, keep: bool = True) -> None:
        if not keep:
            self._host = None   # nothing to keep, now or later (a deeper release drops a copy made before)
        if self.released:
            self._kept = self._kept and keep
            return
        if not all(s.resizable() for s in self.storages):   # refused before anything changed
            raise RuntimeError("a storage to release is not resizable (memory-mapped weights?); clone the "
                               "tensors into owned memory first (memory.owned)")
        pin = self.device.type == "cuda"
        if keep:
            if self._host is None:
                self._host = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in self.nbytes]
            for storage, n, host in zip(self.storages, self.nbytes, self._host):
                host.copy_(byte_view(storage, n), non_blocking=pin)
            if pin:
                torch.cuda.synchronize(self.device)
        for storage in self.storages:
            storage.resize_(0)
        self.released, self._kept = True, keep

    def restore(self) -> bool:
        """Allocates the storages again; returns whether their content came back (False after keep=False)."""
        if not self.released:
            return True
        for storage, n in zip(self.storages, self.nbytes):
            storage.resize_(n)
        if self._kept:
            pin = self.device.type == "cuda"
            for storage, n, host in zip(self.storages, self.nbytes, self._host):
                byte_view(storage, n).copy_(host, non_blocking=pin)
            if pin:
                torch.cuda.synchronize(self.device)
        self.released = False
        return self._kept


def _storages(tensors: Iterable[torch.Tensor], device: torch.device) -> list[torch.UntypedStorage]:
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        if isinstance(t, DTensor):   # a shard (parameter, gradient, optimizer state): its local tensor
            t = t.to_local()
        if t is None or t.device != device:
            continue
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage
    return list(seen.values())


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
