"""FSDP2 trainer backend: `fully_shard` on every decoder layer and the root, even at world size 1,
so the same code runs on one CPU process (gloo) or N GPUs (NCCL)."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from services.common.batches import MicroBatch
from services.common.config import RLConfig
from services.common.models import ModelLoadError, resolve_dtype
from services.common.packing import position_ids_for
from services.common.weight_sync import ParamMeta
from services.trainer import attention, checkpoint
from services.trainer.backend import TrainerBackend, optimizer_state
from services.trainer.build import KEY, build_sharded, model_kwargs
from services.trainer.loss import (
    LossConfig,
    combine_metrics,
    fused_head_logprobs_and_entropy,
    policy_loss,
    selected_logprobs_and_entropy,
    token_logprobs_and_entropy,
)
from services.trainer.optim import build_optimizer
from services.trainer.ulysses import SequenceParallel, check_sp

log = logging.getLogger(__name__)


def init_distributed(device: torch.device) -> None:
    """The trainer's own process group: torchrun's env when launched by it, else a world of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


# Model types whose logits are exactly lm_head(final hidden states), with no soft-capping or scaling after
# the head: for them the LM head runs fused with the logprobs (loss.fused_head_logprobs_and_entropy).
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def head_skipped(model: torch.nn.Module):
    """Inside, `model(...).logits` are the final hidden states at the kept positions (the LM head, yielded,
    is skipped) for the fused loss to apply the head itself."""
    head = model.get_output_embeddings()
    head.forward = _identity   # an instance attribute: shadows the class's forward, nothing else changes
    try:
        yield head
    finally:
        del head.forward


class OutOfMemoryGuidance(RuntimeError):
    """torch.OutOfMemoryError during training, with the config keys that remedy it."""


def oom_guidance(cfg: RLConfig, longest_sequence: int) -> str:
    t = cfg.models.policy_trainer
    sp = f"models.policy_trainer.ulysses_sequence_parallel_size (now {t.ulysses_sequence_parallel_size})"
    if t.packing:
        if t.max_token_in_packing <= longest_sequence:
            return (f"CUDA out of memory while training a packed micro-batch: the bin "
                    f"(models.policy_trainer.max_token_in_packing={t.max_token_in_packing}) already holds only "
                    f"one {longest_sequence}-token sequence; raise {sp}")
        return (f"CUDA out of memory while training packed micro-batches: lower "
                f"models.policy_trainer.max_token_in_packing (now {t.max_token_in_packing}) or raise {sp}")
    if cfg.runtime_args.train_micro_batch_size <= 1:
        return (f"CUDA out of memory with runtime_args.train_micro_batch_size=1 (packing off): raise {sp}")
    return (f"CUDA out of memory while training padded micro-batches: lower runtime_args.train_micro_batch_size "
            f"(now {cfg.runtime_args.train_micro_batch_size}), or set models.policy_trainer.packing=True")


def optimizer_oom_guidance(params: int, world_size: int, kl: bool) -> str:
    """OOM in the optimizer step: what fp32 master weights, gradients and AdamW state take per rank."""
    per_rank = 16 * params / world_size / 2**30
    hint = "" if not kl else "; with kl_coef > 0, models.policy_trainer.ref_offload=True moves the reference to host"
    return (f"CUDA out of memory in the optimizer step: fp32 weights, gradients and AdamW state take 16 bytes per "
            f"parameter, {per_rank:.1f} GiB on each of the {world_size} trainer rank(s) for {params / 1e9:.2f}B "
            f"parameters; run the trainer on more GPUs (torchrun --nproc-per-node, sharded by FSDP){hint}")


class FSDPBackend(TrainerBackend):
    @staticmethod
    def check(cfg: RLConfig, world_size: int) -> None:
        """What can be checked without building: the model directory, its architecture (built on the
        meta device, no memory), sequence parallelism against its heads, groupgemm against MoE."""
        t = cfg.models.policy_trainer
        if not os.path.isfile(os.path.join(t.load, "config.json")):
            raise ModelLoadError(f"{KEY}={t.load!r} is not a model directory (no config.json); point it at an HF "
                                 f"model directory")
        try:
            config = AutoConfig.from_pretrained(t.load)
            with torch.device("meta"):
                AutoModelForCausalLM.from_config(config, **model_kwargs(config, cfg))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{KEY}={t.load!r} could not be loaded: {exc}") from exc
        check_sp(t.ulysses_sequence_parallel_size, world_size, config.num_attention_heads,
                 getattr(config, "num_key_value_heads", config.num_attention_heads))
        if t.groupgemm and not model_kwargs(config, cfg):
            raise ValueError(f"models.policy_trainer.groupgemm=True applies only to MoE models; {t.load} "
                             f"({config.model_type}) has no experts: remove it")

    def __init__(self, cfg: RLConfig, device: torch.device):
        self.cfg = cfg
        t = cfg.models.policy_trainer
        self.device = device
        init_distributed(device)
        self.compute_dtype = resolve_dtype(t.dtype, device)
        self.world_size = dist.get_world_size()
        self.flex = t.attn_implementation == "flex_attention"
        self.sp = SequenceParallel.create(t.ulysses_sequence_parallel_size, self.world_size, t.load, self.flex, device)
        mesh = init_device_mesh(device.type, (self.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
              if self.compute_dtype != torch.float32 else MixedPrecisionPolicy())
        try:
            self.model = build_sharded(cfg, device, mesh, mp, train=True)
            # the KL reference: a frozen copy sharded like the policy, optionally kept in host memory
            offload = t.ref_offload and device.type == "cuda"   # on a CPU trainer it is in host memory anyway
            self.ref = (build_sharded(cfg, device, mesh, mp, train=False, offload=offload, copy_of=self.model)
                        if t.kl_coef > 0 else None)
        except MemoryError as exc:
            raise MemoryError(f"host out of memory while loading {t.load}: set models.policy_trainer.meta_init=True "
                              f"so each rank materialises only its shard") from exc
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), cfg)
        self.loss_cfg = LossConfig.of(t)
        self._step = 0
        self._names = [n for n, _ in self.model.named_parameters()]
        # packed rows never hold [tokens, vocab] logits (bench/trainer.py turns it off to measure the gain)
        self.fused_head = (self.model.config.model_type in PLAIN_HEAD_MODELS
                           and isinstance(self.model.get_output_embeddings(), torch.nn.Linear))
        if self.sp:
            self.sp.use_in(self.model, self.ref)
        elif self.flex:
            for model in (self.model, self.ref):
                if model is not None:
                    model.set_attn_implementation(attention.FLEX)

    # ---- forward ------------------------------------------------------------------------------
    def _logprobs(self, model: torch.nn.Module, mb: MicroBatch, with_entropy: bool, only_loss: bool = False):
        """Per-token logprobs (and entropies) over the micro-batch's flat tokens, 0 at sequence starts.
        `only_loss`: exact only where the loss mask is on (0 elsewhere); a packed row then runs the
        LM head and the float32 vocab work for those positions alone (transformers' `logits_to_keep`)."""
        ids = mb.input_ids.to(self.device)
        if self.sp:   # a padded micro-batch runs packed too: the same logprobs, no padding to send around
            return self.sp.logprobs(model, ids, mb.seq_lens, mb.temperature, with_entropy)
        if mb.padded and not self.flex:
            rows = torch.split(ids, mb.seq_lens)
            width = max(mb.seq_lens)
            x = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
            attn = torch.zeros_like(x)
            for r, row in enumerate(rows):
                x[r, : len(row)], attn[r, : len(row)] = row, 1
            logits = model(input_ids=x, attention_mask=attn, use_cache=False).logits
            lp, ent = token_logprobs_and_entropy(logits, x, mb.temperature, with_entropy)
            keep = attn.bool()
            return lp[keep], (ent[keep] if ent is not None else None)
        # Packed (with flex_attention, a padded micro-batch too): position ids restart per sequence;
        # sdpa gets a block-diagonal causal mask derived from them, flex a BlockMask of the lengths,
        # so attention never crosses sequences. flex rows end in a filler sequence (compiled lengths).
        n, lens, extra = len(ids), mb.seq_lens, {}
        if self.flex:
            lens = attention.padded_lens(mb.seq_lens, attention.pad_multiple(self.device))
            ids = F.pad(ids, (0, sum(lens) - n))
            extra["packed"] = attention.block_mask(lens, self.device)
        pos = position_ids_for(lens).to(self.device)
        targets = mb.loss_mask.to(self.device).nonzero().squeeze(1) if only_loss else ids[:0]
        if self.fused_head:
            # every predicted position when not only the loss's (a zero-loss filler too: the head's weight
            # still gets a gradient, so every rank joins FSDP's reduce-scatters)
            targets = targets if len(targets) else (pos[:n] != 0).nonzero().squeeze(1)
        if self.fused_head and len(targets):
            with head_skipped(model) as head:
                hidden = model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                               logits_to_keep=targets - 1, **extra).logits[0]
            lp, ent = fused_head_logprobs_and_entropy(hidden, head.weight, ids[targets], mb.temperature, with_entropy,
                                                      bias=head.bias)
            full = lambda x: ids.new_zeros(n, dtype=x.dtype).scatter(0, targets, x)  # noqa: E731
            return full(lp), (full(ent) if ent is not None else None)
        # (a zero-loss filler runs the full head: its backward must still reach every parameter, so
        # every rank joins FSDP's gradient reduce-scatters)
        if len(targets):   # loss tokens are response tokens: their predecessor is in the same sequence
            logits = model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                           logits_to_keep=targets - 1, **extra).logits[0]
            lp, ent = selected_logprobs_and_entropy(logits, ids[targets], mb.temperature, with_entropy)
            full = lambda x: ids.new_zeros(n, dtype=x.dtype).scatter(0, targets, x)  # noqa: E731
            return full(lp), (full(ent) if ent is not None else None)
        logits = model(input_ids=ids[None], position_ids=pos[None], use_cache=False, **extra).logits[0]
        lp, ent = token_logprobs_and_entropy(logits, ids, mb.temperature, with_entropy)
        not_start = (pos != 0).to(lp.dtype)   # the first token of a sequence has no prediction
        return (lp * not_start)[:n], ((ent * not_start)[:n] if ent is not None else None)

    # ---- TrainerBackend -----------------------------------------------------------------------
    def train_step(self, micro_batches: Iterable[MicroBatch]) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        tokens = count = longest = 0
        try:
            for mb in micro_batches:
                longest = max(longest, max(mb.seq_lens))
                ref = None
                if self.ref is not None:
                    with torch.no_grad():
                        ref, _ = self._logprobs(self.ref, mb, with_entropy=False, only_loss=True)
                    # FSDP keeps the root unit gathered after forward, for a backward the frozen
                    # reference never runs: free it (and anything else gathered) until the next use
                    for unit in self.ref.modules():
                        if isinstance(unit, FSDPModule):
                            unit.reshard()
                lp, ent = self._logprobs(self.model, mb, with_entropy=True, only_loss=True)
                if self.loss_cfg.entropy_coef == 0:
                    ent = ent.detach()
                dev = lambda x: self.sp.shard(x.to(self.device)) if self.sp else x.to(self.device)  # noqa: E731
                prox = dev(mb.proximal_logprobs) if mb.proximal_logprobs is not None else None
                loss, metrics = policy_loss(lp, dev(mb.old_logprobs), dev(mb.advantages), dev(mb.loss_mask),
                                            cfg=self.loss_cfg, num_global_tokens=mb.num_global_tokens,
                                            ref_logprobs=ref, entropy=ent, proximal_logprobs=prox)
                # FSDP averages gradients over its ranks; the loss is already a share of the global
                # token mean, so undo the average to get the sum.
                (loss * self.world_size).backward()
                combine_metrics(totals, metrics)
                share = 1 / self.sp.size if self.sp else 1   # an SP group counts its micro-batch once
                tokens += mb.num_tokens * share
                count += share
        except torch.OutOfMemoryError as exc:
            self.optimizer.zero_grad(set_to_none=True)
            raise OutOfMemoryGuidance(oom_guidance(self.cfg, longest)) from exc
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)  # a failed step changes nothing
            raise
        if count == 0:
            raise ValueError("Train received no micro-batches")
        clip = self.cfg.models.policy_trainer.optimizer.clip_grad
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.optimizer.step()   # AdamW allocates its state (2 x fp32 shards) at the first step
        except torch.OutOfMemoryError as exc:
            self.optimizer.zero_grad(set_to_none=True)
            params = sum(p.numel() for p in self.model.parameters())
            raise OutOfMemoryGuidance(optimizer_oom_guidance(params, self.world_size, self.ref is not None)) from exc
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step += 1
        totals.update(grad_norm=float(norm), tokens=float(tokens), micro_batches=float(count),
                      lr=lr, seconds=time.perf_counter() - start)
        return totals

    @torch.no_grad()
    def compute_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        self.model.eval()
        lp, _ = self._logprobs(self.model, batch, with_entropy=False)
        if self.sp:
            lp = self.sp.gather(lp, batch.num_tokens)
        return lp.float().cpu()

    def data_groups(self, world: int) -> list[int]:
        sp = self.sp.size if self.sp else 1   # an SP group of consecutive ranks shares its micro-batches
        return [rank // sp for rank in range(world)]

    def state_tensors(self) -> Iterator[torch.Tensor]:
        for model in (self.model, self.ref):
            if model is None:
                continue
            for unit in model.modules():   # nothing stays gathered (the root keeps its parameters after forward)
                if isinstance(unit, FSDPModule):
                    unit.reshard()
            for p in model.parameters():   # a shard's local tensor views FSDP's own padded storage
                yield from (t for t in (p, p.grad) if t is not None)
        yield from optimizer_state(self.optimizer)

    def param_specs(self) -> list[ParamMeta]:
        return [ParamMeta(n, self.compute_dtype, tuple(p.shape)) for n, p in self.model.named_parameters()]

    def full_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.world_size == 1:   # one rank holds everything: no all-gather needed
            for name, p in self.model.named_parameters():
                yield name, (p.to_local() if isinstance(p, DTensor) else p).detach()
            return
        # One all-gather per FSDP unit (a decoder layer; the root's embedding, norm and head), in the
        # compute dtype, as forward gathers them; not one per parameter. The root stays gathered to the end.
        owner = {}
        for prefix, module in self.model.named_modules():
            if isinstance(module, FSDPModule):
                owner.update({f"{prefix}.{n}" if prefix else n: module for n, _ in module.named_parameters()})
        gathered: list[FSDPModule] = []
        try:
            for name, _ in list(self.model.named_parameters()):
                unit = owner[name]
                if unit not in gathered:
                    if len(gathered) > 1:
                        gathered.pop().reshard()   # the previous layer (the root stays)
                    unit.unshard()
                    gathered.append(unit)
                yield name, self.model.get_parameter(name).detach()
        finally:
            for unit in gathered:
                unit.reshard()

    def save_checkpoint(self, path: str, extra: dict) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        checkpoint.save(path, {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()},
                        {"step": self._step, "backend": "fsdp", **extra}, self.device)

    def export_hf(self, path: str) -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)   # gathered onto rank 0's CPU
        state = get_model_state_dict(self.model, options=options)
        if dist.get_rank() != 0:
            return
        # transformers writes it: its own on-disk layout (per-expert MoE weights, tied weights once, shards)
        config = copy.deepcopy(self.model.config)
        config.torch_dtype = self.compute_dtype
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.compute_dtype)
        model.load_state_dict({k: v.to(self.compute_dtype) for k, v in state.items()}, assign=True)
        model.tie_weights()
        model.save_pretrained(path)
        source = self.cfg.models.policy_trainer.load
        for name in os.listdir(source):   # tokenizer and generation config travel with the weights
            if name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config", "vocab",
                                "merges")):
                shutil.copy(os.path.join(source, name), path)

    def load_checkpoint(self, path: str) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}
        meta = checkpoint.load(path, state, self.device, "fsdp")   # DCP reshards: the saving world size need not match
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._step = int(meta.pop("step"))
        return meta

    @property
    def step(self) -> int:
        return self._step

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size
