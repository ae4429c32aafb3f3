"""The trainer backend interface: FSDP2 (backends/fsdp.py) and Megatron-core (backends/megatron.py); both use
services/trainer/loss.py."""
from __future__ import annotations

import abc
from typing import Iterable, Iterator

import torch

from services.common.batches import MicroBatch
from services.common.config import RLConfig
from services.common.memory import StorageSwap, free_cached
from services.common.weight_sync import ParamMeta


class TrainerBackend(abc.ABC):
    device: torch.device   # this rank's device (rank 0's sends the weights)
    _swap: StorageSwap | None = None   # what offload() released

    @staticmethod
    def check(cfg: RLConfig, world_size: int) -> None:
        """Raises ValueError naming the key for whatever in `cfg` this backend cannot build, checked
        without building (Setup calls it before it releases the current setup)."""

    @abc.abstractmethod
    def train_step(self, micro_batches: Iterable[MicroBatch]) -> dict[str, float]:
        """Accumulates gradients over the micro-batches of one optimizer step, then steps."""

    @abc.abstractmethod
    def compute_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        """float32 [T] logprobs of batch.input_ids under the current weights (0 at sequence starts)."""

    def data_groups(self, world: int) -> list[int]:
        """The data-parallel replica of each of the trainer's `world` ranks: ranks of one replica train
        the same micro-batches (tensor or sequence parallel splits of them). Default: every rank its own."""
        return list(range(world))

    @abc.abstractmethod
    def param_specs(self) -> list[ParamMeta]:
        """Full (unsharded) parameters in sync order, HF names."""

    @abc.abstractmethod
    def full_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields full parameters in param_specs order (a collective over the trainer's ranks)."""

    @abc.abstractmethod
    def save_checkpoint(self, path: str, extra: dict) -> None: ...

    @abc.abstractmethod
    def export_hf(self, path: str) -> None:
        """Writes an HF model directory (config, safetensors, tokenizer) of the current weights."""

    @abc.abstractmethod
    def load_checkpoint(self, path: str) -> dict:
        """Restores model, optimizer and step; returns the `extra` saved with them."""

    @abc.abstractmethod
    def state_tensors(self) -> Iterable[torch.Tensor]:
        """What offload() moves to host memory: this rank's parameter shards and gradients, the optimizer's
        state and the reference model's shards (those on the device; views of them are fine)."""

    def offload(self) -> None:
        """Moves state_tensors() to host memory in place (every tensor object stays valid) and hands the
        freed memory to the driver. Idempotent; onload() first before anything that uses them. The
        pinned host buffers are kept for the next offload while the state's tensors stay the same."""
        if not self.offloaded:
            tensors = list(self.state_tensors())
            if self._swap is None or not self._swap.covers(tensors):
                self._swap = StorageSwap(tensors, self.device)
            self._swap.release(keep=True)
        free_cached(self.device)

    def onload(self) -> None:
        """Brings back what offload() moved. Idempotent."""
        if self._swap is not None:
            self._swap.restore()

    @property
    def offloaded(self) -> bool:
        return self._swap is not None and self._swap.released

    @property
    @abc.abstractmethod
    def step(self) -> int: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...


def optimizer_state(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state (AdamW: exp_avg, exp_avg_sq, step)."""
    for state in optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))
