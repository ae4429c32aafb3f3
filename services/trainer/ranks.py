"""One trainer service, N ranks: launched by torch's own launcher (`torchrun --nproc-per-node N
-m services.trainer ...`), rank 0 talks gRPC and drives every rank through the same calls. Each
call is broadcast over a gloo control group, then run by every rank, so FSDP's collectives line up.
At world size 1 the calls simply run in-process.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from services.common import weight_sync
from services.common.batches import MicroBatch
from services.common.config import RLConfig, load_config
from services.common.memory import GIB
from services.trainer.backend import TrainerBackend
from services.trainer.backends.fsdp import init_distributed
from services.trainer.loss import EXTREMES

log = logging.getLogger("trainer")

# metrics that are the same on every rank (not summed over ranks), and those of rank 0's GPU
_SHARED_METRICS = {"grad_norm", "lr", "memory/peak_gib", "memory/device_used_gib"}
# operations that need the parameters and optimizer state where they live: after an Offload, they come back first
_NEEDS_STATE = {"train", "logprobs", "send_weights", "save", "export_hf", "load"}


def backend_class(cfg: RLConfig) -> type[TrainerBackend]:
    backend = cfg.models.policy_trainer.backend
    if backend == "fsdp":
        from services.trainer.backends.fsdp import FSDPBackend
        return FSDPBackend
    if backend == "megatron":
        from services.trainer.backends.megatron import MegatronBackend
        return MegatronBackend
    raise ValueError(f"models.policy_trainer.backend={backend!r} is not available in this trainer service")


def build_backend(cfg: RLConfig, device: torch.device) -> TrainerBackend:
    return backend_class(cfg)(cfg, device)


def balance(micro_batches: list[MicroBatch], ranks: int, sp: int = 1,
            data_groups: list[int] | None = None) -> list[list[MicroBatch]]:
    """Every rank gets the same number of micro-batches (FSDP's collectives require it), with
    tokens spread evenly: longest first, dealt in snake order. Missing slots are filled with a
    copy of a real micro-batch whose loss mask is empty (forward and backward, zero gradient).
    The deal is to data-parallel groups, and every rank of a group gets its group's list (each runs
    its slice of every row): `data_groups[r]` is rank r's group (TrainerBackend.data_groups), or,
    without it, ranks // sp groups of `sp` consecutive ranks (Ulysses sequence parallelism)."""
    if data_groups is None:
        data_groups = [rank // sp for rank in range(ranks)]
    groups = max(data_groups) + 1
    order = sorted(micro_batches, key=lambda mb: -mb.num_tokens)
    while len(order) % groups:
        filler = order[-1]
        order.append(MicroBatch(filler.input_ids, filler.seq_lens, torch.zeros_like(filler.loss_mask),
                                filler.old_logprobs, filler.advantages, filler.versions, filler.num_global_tokens,
                                filler.temperature, filler.padded, filler.step, filler.proximal_logprobs))
    shards: list[list[MicroBatch]] = [[] for _ in range(groups)]
    for i, mb in enumerate(order):
        lap, pos = divmod(i, groups)
        shards[pos if lap % 2 == 0 else groups - 1 - pos].append(mb)
    return [shards[data_groups[rank]] for rank in range(ranks)]


class TrainerRanks:
    """The trainer's ranks as one object: rank 0 calls `run(op, ...)`; the other ranks `follow()`."""

    def __init__(self, device: torch.device):
        self.device = device
        init_distributed(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.control = dist.new_group(backend="gloo") if self.world > 1 else None
        self.backend: TrainerBackend | None = None
        self.transport: weight_sync.WeightTransport | None = None   # rank 0 only: it sends for all

    # ---- the channel ---------------------------------------------------------------------------
    def run(self, op: str, *args, payload: Any = None) -> Any:
        """Rank 0: runs `op` on every rank, returns rank 0's result. `args` go to every rank;
        `payload` stays on rank 0 (an op that takes one hands each rank its part itself)."""
        if op in _NEEDS_STATE and self.backend is not None and self.backend.offloaded:
            self.run("onload")
        if self.world > 1:
            dist.broadcast_object_list([(op, args)], src=0, group=self.control)
        fn = getattr(self, f"_{op}")
        return fn(*args) if payload is None else fn(*args, payload)

    def follow(self) -> None:
        """Ranks > 0: run what rank 0 broadcasts, until it says stop."""
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=self.control)
            op, args = message[0]
            if op == "stop":
                return
            try:
                getattr(self, f"_{op}")(*args)
            except Exception:  # noqa: BLE001 - rank 0 reports the same failure to the caller
                log.exception("rank %d: %s failed", self.rank, op)

    def _stop(self) -> None:
        pass

    # ---- operations (every rank runs them) ------------------------------------------------------
    def _setup(self, config_yaml: str) -> None:
        # The old run's model goes first: two copies of a large model need not fit (the config itself
        # was validated by rank 0 before any rank got here).
        self.backend = None
        cfg = load_config(config_yaml)
        self.backend = build_backend(cfg, self.device)

    def _train(self, micro_batches: list[MicroBatch] | None = None) -> dict[str, float]:
        """Rank 0 holds the step's micro-batches (payload); each rank receives its balanced share."""
        mine: list = [None]
        if self.world > 1:
            groups = self.backend.data_groups(self.world)
            shares = balance(micro_batches, self.world, data_groups=groups) if self.rank == 0 else None
            dist.scatter_object_list(mine, shares, src=0, group=self.control)
        else:
            mine = [micro_batches]
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        local = self.backend.train_step(mine[0])
        if self.device.type == "cuda":   # the train phase's peak on this rank's GPU, and the whole GPU after it
            free, total = torch.cuda.mem_get_info(self.device)
            local.update({"memory/peak_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                          "memory/device_used_gib": (total - free) / GIB})
        if self.world == 1:
            return local
        # sums over ranks, except the extremes (a min is the max of its negation) and the shared values
        keys = sorted(local)
        sign = {k: -1.0 if k.endswith("_min") else 1.0 for k in keys if k.endswith(tuple(EXTREMES))}
        totals = torch.tensor([0.0 if k in sign else local[k] for k in keys], dtype=torch.float64)
        peaks = torch.tensor([sign[k] * local[k] if k in sign else -math.inf for k in keys], dtype=torch.float64)
        dist.all_reduce(totals, group=self.control)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=self.control)
        merged = {k: local[k] if k in _SHARED_METRICS else sign[k] * float(p) if k in sign else float(v)
                  for k, v, p in zip(keys, totals.tolist(), peaks.tolist())}
        merged["seconds"] = time.perf_counter() - start
        merged["ranks"] = float(self.world)
        return merged

    def _logprobs(self, batch: MicroBatch) -> torch.Tensor:
        return self.backend.compute_logprobs(batch)   # every rank runs the forward; FSDP gathers weights

    def _send_weights(self) -> int:
        params = self.backend.full_params()    # a collective per parameter: every rank iterates
        if self.rank == 0:
            return self.transport.send(params)
        for _ in params:
            pass
        return 0

    def _offload(self) -> None:
        if self.transport is not None:
            self.transport.release()   # its buffers (broadcast) come back with the next send
        self.backend.offload()

    def _onload(self) -> None:
        self.backend.onload()

    def _save(self, path: str, extra: dict) -> None:
        self.backend.save_checkpoint(path, extra)

    def _export_hf(self, path: str) -> None:
        self.backend.export_hf(path)

    def _load(self, path: str) -> dict:
        return self.backend.load_checkpoint(path)
