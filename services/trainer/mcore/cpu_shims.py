"""Megatron-core on a CPU-only host (CI, this repository's tests): shims installed once per process by
`install()`, and only when torch has no CUDA device, plus one scoped to megatron's pipeline schedule.

megatron-core 0.19.2 assumes a GPU in these places that its CPU-capable code paths still reach:
1. Device placement: about 30 allocations name `torch.cuda.current_device()` directly (the global
   memory buffer of parallel_state, the all-gather outputs of tensor and sequence parallelism, the
   rotary embedding's `inv_freq`, which it moves "to the GPU" at the first forward, the MoE router's
   weight and buffers). On a host without CUDA that call raises, so `torch.cuda.current_device`
   answers "cpu" instead: every such allocation lands on the CPU, where the tensors it meets live.
2. Random state: `CudaRNGStatesTracker` keeps named CUDA generator states (the tensor-parallel
   and expert-parallel streams that dropout and weight init fork). It is replaced by a tracker
   with the same interface over CPU generator states. Activation recompute (`recompute_granularity`)
   also saves and restores "the CUDA generator state" around each recomputed chunk, beside the CPU
   generator's, through `_get_cuda_rng_state` / `_set_cuda_rng_state`; on a host without CUDA there
   is none, so those two hand back an empty state and restore nothing (the CPU generator, which
   megatron restores itself, is the one in use).

3. Pipeline schedule (`megatron.core.pipeline_parallel.schedules`, which the backend runs at every PP
   size): its point-to-point layer calls `torch.cuda.synchronize()` after each exchange of shapes and
   tensors (p2p_communication.py, "to protect against race condition when using batch_isend_irecv"),
   which raises on a host without a CUDA driver; there gloo's `wait()` has already completed the
   exchange, so `synchronize` does nothing. And every schedule allocates its token counter with a
   literal `torch.zeros([], dtype=torch.int, device="cuda")` (schedules.py, at the top of
   forward_backward_no_pipelining and forward_backward_pipelining_without_interleaving), which no
   `current_device` shim reaches: `cuda_factories_on_cpu()` is a torch function mode, entered around
   the schedule only, that sends such a factory call's `device="cuda"` to the CPU.

Nothing else changes; on a CUDA host `install()` does nothing and `cuda_factories_on_cpu()` is empty. tests/unit/test_mcore_shims.py checks
both against megatron-core (a later version that drops or renames these entry points fails there).
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


class CPURNGStatesTracker:
    """megatron's CudaRNGStatesTracker interface over CPU generator states."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_device() -> str:
    return "cpu"


def _no_cuda_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _restore_nothing(*args, **kwargs) -> None:
    return None


def _synchronize_nothing(*args, **kwargs) -> None:
    return None


class _CudaToCPU(TorchFunctionMode):
    """Torch calls with `device="cuda"` (or a torch.device of type cuda) allocate on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cuda_factories_on_cpu():
    """Shim 3's scope: around megatron's pipeline schedule on a host without CUDA (else does nothing)."""
    return _CudaToCPU() if _installed else contextlib.nullcontext()


def install() -> bool:
    """Installs the shims on a host without CUDA; returns whether they are in place."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        from megatron.core.tensor_parallel import random as mrandom

        torch.cuda.current_device = _cpu_device
        mrandom._get_cuda_rng_state = _no_cuda_rng_state
        mrandom._set_cuda_rng_state = _restore_nothing
        mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        torch.cuda.synchronize = _synchronize_nothing
        _installed = True
    return True
