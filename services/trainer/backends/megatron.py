"""Megatron-core trainer backend (`models.policy_trainer.backend=megatron`): megatron's GPTModel with
tensor, sequence, expert and pipeline parallelism (TP, SP, EP, ETP, PP) and data parallelism over the
remaining ranks, the same GRPO loss as FSDP (services/trainer/loss.py), the same optimizer and schedule
(services/trainer/optim.py), weights in and out through the conversion table (services/trainer/convert).

Packed rows go in as THD: the flat tokens with `cu_seqlens`, attention per sequence (mcore/attention.py),
rotary positions restarting per sequence. Under sequence parallelism a row is padded to a multiple of
TP with a zero-loss filler sequence. bf16 compute runs under torch.autocast over fp32 parameters (the
FSDP backend's fp32 master weights with bf16 matmuls). The LM head runs only at the positions the loss
reads (GPTModel's `output_processor`), gathered over the vocabulary's TP shards for the shared loss code.

Every forward and backward runs through megatron-core's own schedule (`get_forward_backward_func`: at
PP=1 forward then backward per micro-batch, at PP>1 the non-interleaved 1F1B pipeline, exchanging each
activation's shape first because packed rows differ in length). The first stage embeds, the last runs
the head and the loss (services/trainer/loss.py, the same per-token normalisation over the step's
`num_global_tokens`) and sends the step's metrics to the other stages, so rank 0 (a first stage)
reports them. Pipeline stages idle while the pipe fills and drains: with m micro-batches per rank and
optimizer step and p stages, a step takes about (m + p - 1) micro-batch times instead of m.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from transformers import AutoConfig

from services.common.batches import MicroBatch
from services.common.config import RLConfig
from services.common.models import ModelLoadError, has_weights, hf_param_specs, load_causal_lm, resolve_dtype
from services.common.packing import cu_seqlens_for, position_ids_for
from services.common.weight_sync import ParamMeta
from services.trainer import checkpoint
from services.trainer.backend import TrainerBackend, optimizer_state
from services.trainer.backends.fsdp import OutOfMemoryGuidance, init_distributed
from services.trainer.convert import hf_io, mcore_io
from services.trainer.convert.shards import Dims, UnsupportedModel, model_items
from services.trainer.loss import LossConfig, combine_metrics, policy_loss, selected_logprobs_and_entropy
from services.trainer.mcore import cpu_shims, patches
from services.trainer.mcore.checkpoint import Views
from services.trainer.mcore.layout import Layout
from services.trainer.mcore.model import build_gpt, transformer_config
from services.trainer.mcore.parallel import (
    clip_grads,
    finish_grads,
    init_parallel,
    retie,
    sum_tied_grads,
    tied_embedding,
)
from services.trainer.mcore.weights import (
    checkpoint_units,
    gather_units,
    load_from_hf,
    load_from_mcore,
    slots,
    sync_units,
)
from services.trainer.optim import build_optimizer

log = logging.getLogger(__name__)
KEY = "models.policy_trainer"


def oom_guidance(cfg: RLConfig, layout: Layout) -> str:
    t = cfg.models.policy_trainer
    size = (f"lower {KEY}.max_token_in_packing (now {t.max_token_in_packing})" if t.packing else
            f"lower runtime_args.train_micro_batch_size (now {cfg.runtime_args.train_micro_batch_size})")
    return (f"CUDA out of memory while training (backend=megatron, {layout.describe()}): {size}, or raise "
            f"{KEY}.tensor_model_parallel_size (now {layout.tp}) or {KEY}.pipeline_model_parallel_size (now "
            f"{layout.pp}), or set {KEY}.recompute_granularity=full")


def _check_keys(t, dims: Dims) -> None:
    if t.moe_permute_fusion:
        import importlib.util
        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError(f"{KEY}.moe_permute_fusion=True needs Transformer Engine's fused permutation kernels, "
                             f"and Transformer Engine is not installed here; set it to False")
    if t.moe_router_bias_update_rate > 0:
        raise ValueError(f"{KEY}.moe_router_bias_update_rate={t.moe_router_bias_update_rate}: {dims.model_type} has "
                         f"no router expert bias for it to update (HF checkpoints and the rollout engines could not "
                         f"carry one); keep 0")
    if dims.experts and t.tensor_model_parallel_size > 1 and not t.sequence_parallel:
        raise ValueError(f"{KEY}.tensor_model_parallel_size={t.tensor_model_parallel_size} on an MoE model needs "
                         f"{KEY}.sequence_parallel=True (megatron-core refuses MoE with TP but without SP)")
    if not dims.experts and (t.groupgemm or t.moe_aux_loss_coeff or t.moe_router_dtype != "fp32"
                             or t.moe_unpermute_dtype != "fp32"):
        raise ValueError(f"{KEY}.groupgemm / moe_* keys apply to MoE models; {dims.model_type} has no experts")


def _model_and_layout(cfg: RLConfig, world_size: int):
    """The HF config, the model's dimensions and the parallel layout, each checked against the other."""
    t = cfg.models.policy_trainer
    try:
        hf_config = AutoConfig.from_pretrained(t.load)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{KEY}.load={t.load!r} could not be loaded: {exc}") from exc
    try:
        dims = Dims.from_hf(hf_config)
    except UnsupportedModel as exc:
        raise ModelLoadError(f"{KEY}.load={t.load!r}: {exc}") from exc
    _check_keys(t, dims)
    layout = Layout.from_config(t, world_size)
    layout.check_model(dims)
    return hf_config, dims, layout


class MegatronBackend(TrainerBackend):
    @staticmethod
    def check(cfg: RLConfig, world_size: int) -> None:
        """The model directory, its type, the MoE keys and the parallel layout, checked without building."""
        _model_and_layout(cfg, world_size)

    def __init__(self, cfg: RLConfig, device: torch.device):
        self.cfg = cfg
        t = cfg.models.policy_trainer
        self.device = device
        init_distributed(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)   # megatron allocates on the current CUDA device
        cpu_shims.install()
        self.hf_config, self.dims, self.layout = _model_and_layout(cfg, dist.get_world_size())
        init_parallel(self.layout, cfg.runtime_args.seed)
        patches.set_unpermute_dtype(torch.float32 if t.moe_unpermute_dtype == "fp32" else None)
        patches.install_router_patch()
        patches.install_rope_patch()
        self.coords = self.layout.coords(dist.get_rank())
        self._expert_group = None
        if self.dims.experts and self.layout.ep * self.layout.etp > 1:
            from megatron.core import parallel_state as ps
            self._expert_group = ps.get_expert_tensor_and_model_parallel_group()
        self.compute_dtype = resolve_dtype(t.dtype, device)
        self.model = self._build(train=True)
        self.table = slots(self.model, self.dims, self.layout, self.coords)
        self._load_weights(self.table)
        self._tied = tied_embedding(self.model)
        retie(self._tied)
        self.ref = None
        if t.kl_coef > 0:   # a frozen copy of the policy, sharded like it
            self.ref = self._build(train=False)
            with torch.no_grad():
                for name, slot in slots(self.ref, self.dims, self.layout, self.coords).items():
                    slot.tensor.copy_(self.table[name].tensor)
                if self._tied is not None:
                    tied_embedding(self.ref).copy_(self._tied)
        # the optimizer's parameters: all but the last stage's copy of a tied embedding (parallel.retie)
        copy = self._tied if self._tied is not None and self.model.post_process else None
        self.named = [(n, p) for n, p in self.model.named_parameters() if p is not copy]
        self.optimizer, self.scheduler = build_optimizer([p for _, p in self.named], cfg)
        self.loss_cfg = LossConfig.of(t)
        self._step = 0
        self._specs = [ParamMeta(n, self.compute_dtype, s) for n, s in hf_param_specs(t.load, self.compute_dtype)]
        self._sync_units = sync_units([(p.name, p.shape) for p in self._specs], self.dims, self.compute_dtype)

    # ---- building and loading ------------------------------------------------------------------
    def _build(self, train: bool):
        t = self.cfg.models.policy_trainer
        init = not (has_weights(t.load) or mcore_io.is_checkpoint(t.load))
        meta = t.meta_init and not init
        # (CPU initialisation allocates through the default device, so a meta-device build allocates nothing)
        config = transformer_config(self.dims, t, self.layout, init=init and t.meta_init,
                                    init_std=getattr(self.hf_config, "initializer_range", 0.02),
                                    cpu=self.device.type == "cpu" or meta)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = build_gpt(self.dims, t, self.layout, config, self.coords.pp)
        if meta:
            model.to_empty(device=self.device)
        else:
            model.to(self.device)
        if not train:
            model.eval().requires_grad_(False)
        return model

    def _load_weights(self, table) -> None:
        t = self.cfg.models.policy_trainer
        if mcore_io.is_checkpoint(t.load):      # convert's output (or a megatron checkpoint) as the start
            load_from_mcore(table, t.load)
        elif has_weights(t.load):               # an HF directory: through the conversion table, one family at a time
            with hf_io.HFReader(t.load) as reader:
                load_from_hf(table, reader.get, self.dims)
        elif not t.meta_init:                   # config only: transformers' seeded init, as the FSDP backend does
            # (initialised where the FSDP backend initialises it, so both start from the same seeded weights)
            model = load_causal_lm(t.load, dtype=torch.float32, device=self.device, seed=self.cfg.runtime_args.seed,
                                   key=f"{KEY}.load")
            load_from_hf(table, hf_io.StateDictReader(model.state_dict()).get, self.dims)
        # (config only with meta_init: megatron's own initialisation on each shard, done at build)

    # ---- forward ------------------------------------------------------------------------------
    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _forward(self, model, mb: MicroBatch, targets: torch.Tensor) -> torch.Tensor:
        """This stage's forward of the micro-batch's packed row: on the last stage the logits [len(targets),
        vocab] at `targets` (positions whose predecessor is in the same sequence), elsewhere the hidden
        states for the next stage (the previous stage's arrive through megatron's `set_input_tensor`)."""
        from megatron.core.packed_seq_params import PackedSeqParams
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        ids = mb.input_ids.to(self.device)
        lens = list(mb.seq_lens)
        sp = self.cfg.models.policy_trainer.sequence_parallel
        width = self._row_width(len(ids), sp)
        if width > len(ids):   # a zero-loss filler sequence pads the row
            lens.append(width - len(ids))
            ids = torch.cat([ids, ids.new_zeros(width - len(ids))])
        cu = cu_seqlens_for(lens).to(self.device)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                                 max_seqlen_kv=max(lens))
        pos = position_ids_for(lens).to(self.device)
        vocab = self.dims.vocab

        def head(hidden_states, output_layer, output_weight, **_):
            h = hidden_states
            if sp:   # the whole row on every TP rank; gradients split back (the head all-reduces them)
                h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
            h = h[targets - 1]
            was, output_layer.sequence_parallel = output_layer.sequence_parallel, False
            try:
                logits, _ = output_layer(h, weight=output_weight, runtime_gather_output=True)
            finally:
                output_layer.sequence_parallel = was
            return logits[:, 0, :vocab]

        with self._autocast():
            out = model(ids[None], pos[None], None, packed_seq_params=packed, output_processor=head)
        return out if model.post_process else out.float()   # the schedule's pipeline_dtype

    def _schedule(self, model, micro_batches: list[MicroBatch], targets_of, on_logits, forward_only: bool) -> list:
        """Runs the micro-batches through megatron's schedule (every rank of the model calls it). On the last
        stage `on_logits(i, mb, targets, logits)` gets each micro-batch's logits at `targets_of(mb)` and
        returns its (loss, metrics) when training, or what to collect when `forward_only`. Returns what was
        collected, in micro-batch order (on the last stage; [] elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data, module):
            i, mb = next(data)
            targets = targets_of(mb).to(self.device)
            out = self._forward(module, mb, targets)

            def loss_func(logits, non_loss_data=False):
                with torch.autocast(self.device.type, enabled=False):   # the loss in float32, as on FSDP
                    return on_logits(i, mb, targets, logits)
            return out, loss_func

        n = len(micro_batches)
        # the schedule divides each micro-batch's loss (and the MoE aux loss's scale) by the number of
        # micro-batches; ours already is its share of the step's token mean, so the backward multiplies it
        # back (exactly: the gradient reaching the loss is n / n = 1)
        model.config.grad_scale_func = None if forward_only else (lambda loss: loss * n)
        # megatron's linear layers restore autocast in backward for CUDA only (custom_bwd with
        # device_type="cuda"); on a CPU trainer in bf16 the backward runs in the same region instead
        region = self._autocast() if self.device.type == "cpu" else contextlib.nullcontext()
        with cpu_shims.cuda_factories_on_cpu(), region:
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(enumerate(micro_batches)), model=model,
                num_microbatches=n, seq_length=0, micro_batch_size=1,   # (shapes travel: variable_seq_lengths)
                forward_only=forward_only, collect_non_loss_data=forward_only)

    def _from_last_stage(self, value):
        """`value` as the last pipeline stage has it, on every stage (an object; every rank calls it)."""
        if self.layout.pp == 1:
            return value
        from megatron.core import parallel_state as ps
        group = ps.get_pipeline_model_parallel_group()
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, self.layout.pp - 1), group=group)
        return box[0]

    def _row_width(self, n: int, sp: bool) -> int:
        """The row's length as run: megatron's allgather token dispatcher gathers equal shapes over the
        expert tensor-and-model-parallel group, whose ranks hold different micro-batches (data parallel),
        so MoE rows there are padded to the group's longest; SP splits a row evenly over TP ranks."""
        if self._expert_group is not None:
            longest = torch.tensor([n], dtype=torch.int64, device=self.device)   # NCCL reduces device tensors
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self._expert_group)
            n = int(longest)
        return -(-n // self.layout.tp) * self.layout.tp if sp else n

    @staticmethod
    def _loss_targets(mb: MicroBatch) -> tuple[torch.Tensor, bool]:
        """Loss positions; a zero-loss filler still runs one position through the head so that its
        backward reaches every layer (expert-parallel ranks exchange tokens in backward too)."""
        targets = mb.loss_mask.nonzero().squeeze(1)
        if len(targets):
            return targets, True
        return (position_ids_for(mb.seq_lens) > 0).nonzero()[:1].squeeze(1), False

    # ---- TrainerBackend -----------------------------------------------------------------------
    def train_step(self, micro_batches: Iterable[MicroBatch]) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        share = 1 / (self.layout.tp * self.layout.pp)   # ranks of one data-parallel replica report once
        totals: dict[str, float] = {}
        targets_of = lambda mb: self._loss_targets(mb)[0]  # noqa: E731

        def loss_of(i: int, mb: MicroBatch, targets: torch.Tensor, logits: torch.Tensor):
            lp, ent = selected_logprobs_and_entropy(logits, mb.input_ids.to(self.device)[targets], mb.temperature,
                                                    True)
            if self.loss_cfg.entropy_coef == 0:
                ent = ent.detach()
            full = lambda x: x.new_zeros(mb.num_tokens).scatter(0, targets, x)  # noqa: E731
            prox = mb.proximal_logprobs.to(self.device) if mb.proximal_logprobs is not None else None
            loss, metrics = policy_loss(full(lp), mb.old_logprobs.to(self.device), mb.advantages.to(self.device),
                                        mb.loss_mask.to(self.device), cfg=self.loss_cfg,
                                        num_global_tokens=mb.num_global_tokens,
                                        ref_logprobs=full(refs[i]) if refs is not None else None, entropy=full(ent),
                                        proximal_logprobs=prox)
            combine_metrics(totals, metrics, share)
            return loss, metrics

        try:
            mbs = list(micro_batches)
            if not mbs:
                raise ValueError("Train received no micro-batches")
            refs = None
            if self.ref is not None:   # the reference's logprobs of every micro-batch, on the last stage
                with torch.no_grad():
                    refs = self._schedule(self.ref, mbs, targets_of, self._selected_logprobs, forward_only=True)
            self._schedule(self.model, mbs, targets_of, loss_of, forward_only=False)
        except torch.OutOfMemoryError as exc:
            self.model.zero_grad(set_to_none=True)
            raise OutOfMemoryGuidance(oom_guidance(self.cfg, self.layout)) from exc
        except BaseException:
            self.model.zero_grad(set_to_none=True)   # a failed step changes nothing
            raise
        totals = self._from_last_stage(totals)
        clip = self.cfg.models.policy_trainer.optimizer.clip_grad
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            sum_tied_grads(self._tied)
            finish_grads(self.named, self.cfg.models.policy_trainer.sequence_parallel)
            norm = clip_grads(self.named, self.layout, clip if clip > 0 else float("inf"))
            self.optimizer.step()
        except torch.OutOfMemoryError as exc:
            self.model.zero_grad(set_to_none=True)
            raise OutOfMemoryGuidance(oom_guidance(self.cfg, self.layout)) from exc
        retie(self._tied)
        self.scheduler.step()
        self.model.zero_grad(set_to_none=True)
        self._step += 1
        totals.update(grad_norm=norm, tokens=sum(mb.num_tokens for mb in mbs) * share, micro_batches=len(mbs) * share,
                      lr=lr, seconds=time.perf_counter() - start)
        return totals

    def _selected_logprobs(self, i: int, mb: MicroBatch, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return selected_logprobs_and_entropy(logits, mb.input_ids.to(self.device)[targets], mb.temperature, False)[0]

    @torch.no_grad()
    def compute_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        self.model.eval()
        pos = position_ids_for(batch.seq_lens)
        targets = (pos > 0).nonzero().squeeze(1)
        out = torch.zeros(batch.num_tokens, dtype=torch.float32, device=self.device)
        if len(targets):
            collected = self._schedule(self.model, [batch], lambda mb: targets, self._selected_logprobs,
                                       forward_only=True)
            if collected:   # the last stage
                out[targets.to(self.device)] = collected[0].float()
            if self.layout.pp > 1:   # to every stage: rank 0 (a first stage) answers
                from megatron.core import parallel_state as ps
                group = ps.get_pipeline_model_parallel_group()
                dist.broadcast(out, src=dist.get_global_rank(group, self.layout.pp - 1), group=group)
        return out.cpu()

    def data_groups(self, world: int) -> list[int]:
        return self.layout.data_parallel_ranks()

    def state_tensors(self) -> Iterator[torch.Tensor]:
        for model in (self.model, self.ref):
            for p in model.parameters() if model is not None else ():
                yield from (t for t in (p, p.grad) if t is not None)
        yield from optimizer_state(self.optimizer)

    def param_specs(self) -> list[ParamMeta]:
        return list(self._specs)

    def full_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        budget = self.cfg.runtime_args.weight_sync_bucket_mb << 20
        yield from gather_units(self._sync_units, self.table, self.dims, self.compute_dtype, budget)

    def export_hf(self, path: str) -> None:
        """HF checkpoint layout, streamed: rank 0 writes each bucket of gathered tensors as it comes."""
        items = model_items(self.dims)
        units = checkpoint_units(items, self.dims, self.compute_dtype)
        budget = self.cfg.runtime_args.weight_sync_bucket_mb << 20
        stream = gather_units(units, self.table, self.dims, self.compute_dtype, budget)
        if dist.get_rank() != 0:
            for _ in stream:
                pass
            return
        from services.trainer.convert.shards import hf_shapes
        specs = [(n, s, self.compute_dtype) for it in items for n, s in zip(it.hf, hf_shapes(it, self.dims))]
        hf_io.write_hf_weights(path, specs, stream)
        hf_io.copy_extras(self.cfg.models.policy_trainer.load, path)
        config = AutoConfig.from_pretrained(self.cfg.models.policy_trainer.load)
        config.dtype = self.compute_dtype
        config.save_pretrained(path)

    def save_checkpoint(self, path: str, extra: dict) -> None:
        views = Views(self.table, self.dims.vocab, self.device)
        state = {"model": views.model(), "optim": views.optim(self.optimizer), "scheduler": self.scheduler.state_dict()}
        checkpoint.save(path, state, {"step": self._step, "backend": "megatron", **extra}, self.device)
        if dist.get_rank() == 0:
            hf_io.copy_extras(self.cfg.models.policy_trainer.load, path)

    def load_checkpoint(self, path: str) -> dict:
        views = Views(self.table, self.dims.vocab, self.device)
        state = {"model": views.model(), "optim": views.optim(self.optimizer), "scheduler": self.scheduler.state_dict()}
        meta = checkpoint.load(path, state, self.device, "megatron")   # into views of the parameters and AdamW's state, any layout
        retie(self._tied)
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr   # the schedule's position (the saved groups are not in the checkpoint)
        self._step = int(meta.pop("step"))
        return meta

    @property
    def step(self) -> int:
        return self._step

    @property
    def vocab_size(self) -> int:
        return self.dims.vocab

