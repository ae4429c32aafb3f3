"""Building the trainer's models, sharded by FSDP2 over the trainer's ranks.

Two ways, one result:
- default: every rank loads the whole model on the host (`from_pretrained`), then `fully_shard`
  keeps its shard. Host memory per rank peaks at the full fp32 model.
- `models.policy_trainer.meta_init=True`: the model is built on the meta device (no memory), sharded,
  materialised empty on the device, and each rank reads only its rows of the safetensors (lazy
  safetensors slices). Host memory stays far below the full model. A config-only directory gets
  transformers' own initialisation on the shards instead.
"""
from __future__ import annotations

import glob
import os
from contextlib import ExitStack

import torch
from safetensors import safe_open
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from services.common.config import RLConfig
from services.common.models import ModelLoadError, has_weights, load_causal_lm
from services.trainer.attention import allow_recompiles

KEY = "models.policy_trainer.load"


def model_kwargs(config, cfg: RLConfig) -> dict:
    """Loader options from the config: MoE experts as one grouped matmul (`groupgemm=True`, transformers'
    grouped_mm implementation) or the per-expert loop (`eager`)."""
    if getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0):
        return {"experts_implementation": "grouped_mm" if cfg.models.policy_trainer.groupgemm else "eager"}
    return {}


def build_sharded(cfg: RLConfig, device: torch.device, mesh, mp: MixedPrecisionPolicy, *, train: bool,
                  offload: bool = False, copy_of: PreTrainedModel | None = None) -> PreTrainedModel:
    """The policy (train=True) or the frozen reference (train=False), fp32 master weights, sharded.
    `copy_of`: a model built by this function whose shards this one copies instead of loading (the
    reference starts as the policy's exact copy, whatever the init). `offload` keeps the sharded
    parameters on the host between uses (FSDP2 CPU offload)."""
    t = cfg.models.policy_trainer
    path = t.load
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{KEY}={path!r} could not be loaded: {exc}") from exc
    extra = model_kwargs(config, cfg)
    if t.torch_compile:
        allow_recompiles()
    home = torch.device("cpu") if offload else device   # where this rank's shards live
    if t.meta_init or copy_of is not None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa",
                                                     **extra)
    else:
        model = load_causal_lm(path, dtype=torch.float32, device=home,
                               seed=cfg.runtime_args.seed, key=KEY, **extra)
    if train and t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mesh=mesh, mp_policy=mp, offload_policy=policy)
            if t.torch_compile:   # the layer's own computation; FSDP's gather/reshard hooks stay outside
                module.forward = torch.compile(module.forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)
    if copy_of is not None:
        with torch.no_grad():
            model.to_empty(device=home)
            pairs = zip([*model.parameters(), *model.buffers()], [*copy_of.parameters(), *copy_of.buffers()])
            for mine, theirs in pairs:
                local = mine.to_local() if isinstance(mine, DTensor) else mine
                local.copy_(theirs.to_local() if isinstance(theirs, DTensor) else theirs)
    elif t.meta_init:
        _materialize(model, path, home, cfg.runtime_args.seed)
    if not train:
        model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def _materialize(model: PreTrainedModel, path: str, device: torch.device, seed: int) -> None:
    """Allocates this rank's shards (and the small unsharded buffers) and fills them."""
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # transformers' init also recomputes the buffers that are not in checkpoints (rotary inv_freq)
        model.initialize_weights()
    model.tie_weights()
    if has_weights(path):
        _load_local_rows(model, path)


def _load_local_rows(model: PreTrainedModel, path: str) -> None:
    """Copies this rank's rows of every parameter from the safetensors: FSDP2 shards dim 0 in
    `torch.chunk` order, and a safetensors slice reads only those rows from disk. MoE experts are
    stored per expert in HF checkpoints (`experts.<e>.gate_proj.weight` ...) and fused in memory
    (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]): each rank reads its experts."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    with ExitStack() as stack:
        opened = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        where = {key: f for f in opened for key in f.keys()}

        def rows(key: str, lo: int, hi: int) -> torch.Tensor:
            if key not in where:
                raise ModelLoadError(f"{KEY}={path!r}: no tensor {key!r} in its safetensors")
            return where[key].get_slice(key)[lo:hi]

        tied = getattr(model.config, "tie_word_embeddings", False)
        for name, param in model.named_parameters():
            if tied and name == "lm_head.weight":
                continue   # the embedding, loaded once
            local = param.to_local() if isinstance(param, DTensor) else param
            world = param.device_mesh.size() if isinstance(param, DTensor) else 1
            rank = param.device_mesh.get_local_rank() if isinstance(param, DTensor) else 0
            lo = rank * -(-param.shape[0] // world)
            hi = lo + local.shape[0]
            if local.numel() == 0:
                continue
            if name in where:
                local.copy_(rows(name, lo, hi))
            elif name.endswith("experts.gate_up_proj"):
                prefix = name.removesuffix("gate_up_proj")
                for i, e in enumerate(range(lo, hi)):
                    local[i].copy_(torch.cat([rows(f"{prefix}{e}.gate_proj.weight", 0, None),
                                              rows(f"{prefix}{e}.up_proj.weight", 0, None)]))
            elif name.endswith("experts.down_proj"):
                prefix = name.removesuffix("down_proj")
                for i, e in enumerate(range(lo, hi)):
                    local[i].copy_(rows(f"{prefix}{e}.down_proj.weight", 0, None))
            else:
                rows(name, lo, hi)   # raises: the checkpoint lacks this parameter
