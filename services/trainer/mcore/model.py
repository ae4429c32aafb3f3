"""Megatron-core's GPTModel built from an HF config (Qwen3, Qwen3-MoE, Llama) with the local,
Transformer-Engine-free layer spec, our packed attention in the core-attention slot and, with
`groupgemm=True`, grouped-GEMM experts in the experts slot.

GPTModel, not HybridModel: see docs/architecture.md ("Megatron-core backend"). In short: 0.19's
HybridModel ships only a Transformer Engine layer spec, which our GPU image cannot run; GPTModel's local
spec runs on CPU and GPU alike and still receives critical fixes; its per-layer parameter names are
what the conversion table maps.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from services.trainer.convert.shards import Dims, padded_vocab
from services.trainer.mcore.attention import PackedAttention
from services.trainer.mcore.experts import GroupedExperts
from services.trainer.mcore.layout import Layout

ROUTER_DTYPES = {"fp32": "fp32", "fp64": "fp64", "native": None}


def transformer_config(dims: Dims, t, layout: Layout, *, init: bool, init_std: float,
                       cpu: bool) -> TransformerConfig:
    """`t` is models.policy_trainer. Dropout is off (RL losses compare exact logprobs)."""
    recompute = {}
    if t.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif t.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    moe = {}
    if dims.experts:
        moe = dict(num_moe_experts=dims.experts, moe_router_topk=dims.topk, moe_ffn_hidden_size=dims.expert_ffn,
                   moe_router_score_function="softmax",
                   # top-k of the logits then softmax over them = softmax, top-k, renormalised (norm_topk_prob)
                   moe_router_pre_softmax=not dims.norm_topk_prob,
                   moe_router_dtype=ROUTER_DTYPES[t.moe_router_dtype],
                   moe_aux_loss_coeff=t.moe_aux_loss_coeff,
                   moe_router_load_balancing_type="aux_loss" if t.moe_aux_loss_coeff > 0 else "none",
                   moe_router_enable_expert_bias=False,
                   # allgather: megatron's default, and 0.19's alltoall dispatcher needs CUDA streams
                   moe_token_dispatcher_type="allgather",
                   moe_grouped_gemm=t.groupgemm, moe_permute_fusion=t.moe_permute_fusion,
                   moe_layer_freq=[int(i in dims.moe_layers) for i in range(dims.layers)])
    config = TransformerConfig(
        num_layers=dims.layers, hidden_size=dims.hidden, num_attention_heads=dims.heads,
        num_query_groups=dims.kv_heads, kv_channels=dims.head_dim,
        ffn_hidden_size=dims.dense_ffn or dims.expert_ffn, normalization="RMSNorm", layernorm_epsilon=dims.eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=dims.qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        sequence_parallel=t.sequence_parallel,
        # fp32 parameters: bf16 compute runs under torch.autocast, like the FSDP backend's fp32 master weights
        params_dtype=torch.float32, perform_initialization=init, use_cpu_initialization=cpu, init_method_std=init_std,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_activation_fusion=False,
        # activations between pipeline stages are float32 (the residual stream of fp32 parameters, also under
        # autocast); megatron's own initial tie of a split embedding and LM head moves the weight with `.cuda()`:
        # the backend ties them itself instead (parallel.retie)
        pipeline_dtype=torch.float32, init_model_with_meta_device=layout.pp > 1,
        **recompute, **moe)
    # Packed rows differ in length from one micro-batch to the next: the pipeline schedule exchanges each
    # activation's shape before it (p2p_communication reads nothing else of this flag). Set after
    # construction because the config refuses it with the allgather token dispatcher, whose all-gathers
    # need equal rows over the expert group; the backend pads MoE rows to the group's longest for that.
    config.variable_seq_lengths = True
    return config


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as megatron's layer-norm builder wants it. The local spec's WrappedTorchNorm refuses
    sequence parallelism; here a hidden-size norm under SP marks its weight `sequence_parallel`, so its
    gradient (partial per TP rank: each saw part of the sequence) is summed over TP (parallel.finish_grads)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel and hidden_size == config.hidden_size


def _layer_spec(dims: Dims, moe: bool, groupgemm: bool):
    spec = get_gpt_layer_local_spec(num_experts=dims.experts if moe else None, moe_grouped_gemm=groupgemm,
                                    normalization="RMSNorm", qk_layernorm=dims.qk_norm)
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = RMSNorm
    attention = sub.self_attention.submodules
    attention.core_attention = PackedAttention
    if dims.qk_norm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    if moe and groupgemm:
        sub.mlp = functools.partial(MoELayer, submodules=MoESubmodules(experts=GroupedExperts))
    return spec


def block_spec(dims: Dims, groupgemm: bool, layers: range | None = None) -> TransformerBlockSubmodules:
    """The spec of each layer in `layers` (default: all; MoE layers and dense ones, as the HF config
    places them) and the final norm (which megatron builds on the last pipeline stage only)."""
    dense, moe = _layer_spec(dims, False, groupgemm), _layer_spec(dims, True, groupgemm) if dims.experts else None
    layers = range(dims.layers) if layers is None else layers
    return TransformerBlockSubmodules(layer_specs=[moe if i in dims.moe_layers else dense for i in layers],
                                      layer_norm=RMSNorm)


def build_gpt(dims: Dims, t, layout: Layout, config: TransformerConfig, pp_rank: int = 0) -> GPTModel:
    """This rank's part of the model: its pipeline stage's layers (the first stage embeds, the last holds
    the final norm and the LM head), its TP shard, its experts."""
    last = pp_rank == layout.pp - 1
    return GPTModel(config, block_spec(dims, t.groupgemm, layout.layers_of(pp_rank, dims.layers)),
                    vocab_size=padded_vocab(dims.vocab, layout.tp), max_sequence_length=max(t.max_token_in_packing, 1),
                    pre_process=pp_rank == 0, post_process=last, position_embedding_type="rope",
                    rotary_base=dims.rope_theta, share_embeddings_and_output_weights=dims.tied)


def local_tensors(model: GPTModel) -> dict[str, tuple[torch.nn.Parameter, int | None]]:
    """Every tensor of this rank under its local Megatron name, as (parameter, index): grouped experts
    appear per expert under SequentialMLP's names, as (stacked parameter, local expert index)."""
    out: dict[str, tuple[torch.nn.Parameter, int | None]] = {}
    for name, p in model.named_parameters():
        if not (name.endswith((".weight1", ".weight2")) and ".mlp.experts." in name):
            out[name] = (p, None)
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            out.update(module.expert_views(f"{name}."))
    return out
