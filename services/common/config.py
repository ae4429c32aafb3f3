"""Run configuration for rlgrid: schema, loading, merging and validation.

The hierarchy follows ChatLearn's (``runtime_args`` plus ``models.policy`` /
``models.policy_trainer`` / ``models.reward``) so ChatLearn users' YAML files and
dotted command-line overrides (``models.policy_trainer.packing=True``) carry over.
The schema is a tree of dataclasses validated by OmegaConf structured configs.
Merge order: schema defaults < YAML file/text < overrides. Every problem raises
:class:`ConfigError` naming the dotted key(s) involved and how to fix them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ENGINES = ("builtin", "vllm")
BACKENDS = ("fsdp", "megatron")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
ROLLOUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAINER_DTYPES = ("auto", "float32", "bfloat16")
TRAINER_ATTENTION = ("sdpa", "flex_attention")
RECOMPUTE = (None, "full", "selective")
MOE_DTYPES = ("fp32", "fp64", "native")
PLACEMENTS = ("auto", "colocated", "disaggregated")
TIS_MODES = ("truncate", "mask")
# Sampling temperatures accepted anywhere (config, Generate, Train): below 0.01 float32 logits / T
# overflow to inf and the logprobs turn NaN; above 100 the distribution is uniform to float32 precision.
# (0 on the wire means greedy decoding, which evaluation asks for.)
TEMPERATURE_RANGE = (0.01, 100.0)
EXP_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


# Config text is parsed before anything else looks at it: its size is bounded first (YAML parsing
# runs at about a MiB a second; alias expansion is bounded by OmegaConf itself).
MAX_CONFIG_CHARS = 1 << 20


class ConfigError(ValueError):
    """Invalid run configuration; the message names the dotted key(s) and the fix."""


@dataclass
class RpcTimeouts:
    """Deadlines in seconds of the coordinator's calls into the trainer and rollout services. A service
    that stops answering fails the call after this long, with a message naming it and the key."""
    setup: float = 1800.0  # Setup: building a trainer or an engine (model load, vLLM start-up)
    generate: float = 1800.0  # one Generate call: a replica's share of a step's samples
    train: float = 1800.0  # one Train call: one optimizer step
    logprobs: float = 600.0  # ComputeLogProbs: the agreement check's forward pass
    weight_sync: float = 600.0  # Prepare/Send/Receive/CommitWeights; also the sync group's collective timeout
    checkpoint: float = 3600.0  # SaveCheckpoint, LoadCheckpoint, ExportHF
    memory: float = 600.0  # Sleep, WakeUp (rollout) and Offload, Onload (trainer): moving weights and optimizer state
    control: float = 10.0  # GetInfo, AbortWeights and health probes


@dataclass
class RuntimeArgs:
    num_episode: int = 20  # number of episodes (rollout + train rounds) to run
    sample_per_episode: int = 64  # samples (prompts x responses) generated per episode
    num_inference_per_prompt: int = 8  # responses per prompt, i.e. the GRPO group size
    train_global_batch_size: int = 64  # samples per optimizer step
    train_micro_batch_size: int = 8  # samples per forward/backward pass when packing is off
    save_episode_interval: int = 0  # save a checkpoint every N episodes (0 = never)
    data_path: str = ""  # training prompts (JSONL)
    eval_data_path: str = ""  # held-out prompts (JSONL) evaluated at step 0, every eval_episode_interval and at the end; "" = none
    eval_episode_interval: int = 0  # evaluate every N episodes (0 = only before the first and after the last)
    output_dir: str = "./output"  # where checkpoints, logs and metrics go
    seed: int = 42  # random seed for data order, sampling and initialisation
    data_shuffle: bool = True  # shuffle the training prompts each pass over the data
    exp_name: str = "rlgrid"  # names the run: its run_id (and so its directory under output_dir/runs/) starts with it
    logprob_diff_threshold: float = 0.5  # max abs trainer/rollout logprob diff after a weight sync
    agreement_samples: int = 4  # samples per step used by that logprob agreement check
    weight_sync_bucket_mb: int = 64  # size of one weight-sync transfer bucket (MiB)
    step_retries: int = 1  # how often a failed rollout is retried on other replicas
    resume_from: str = ""  # a checkpoint-<episode> directory of an earlier run to continue from ("" = fresh)
    placement: str = "auto"  # colocated (take turns on shared GPUs), disaggregated, or auto (from the services' GPUs)
    off_policy_steps: int = 0  # rollout runs up to N steps ahead of training (0 = synchronous; N > 0: disaggregated)
    trainer_restarts: int = 0  # times a run that lost its trainer resumes from its last checkpoint (0 = it fails)
    trainer_restart_wait_s: float = 600.0  # how long it waits for a trainer to register again, per restart
    rpc_timeout_s: RpcTimeouts = field(default_factory=RpcTimeouts)  # deadlines of the calls between services


@dataclass
class PolicyConfig:
    engine: str = "builtin"  # rollout engine: builtin or vllm
    load: str = ""  # HF model directory; config.json without weights = random init
    dtype: str = "auto"  # rollout dtype: auto, float32, bfloat16 or float16
    tensor_model_parallel_size: int = 1  # devices one rollout replica is sharded over
    enforce_eager: bool = False  # disable CUDA graphs in the rollout engine
    gpu_memory_utilization: float = 0.8  # fraction of device memory the engine may use
    max_prompt_tokens_length: int = 1024  # prompts longer than this are dropped
    max_response_tokens_length: int = 2048  # most tokens generated per response
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling probability mass
    top_k: int = -1  # sample from the k most likely tokens (-1 = off)
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end a response
    max_num_seqs: int = 64  # the built-in engine's batch size (sequences decoded together)
    enable_sleep_mode: bool = False  # vLLM's sleep mode, so the replica can release its GPU memory while the trainer runs (GPU only)


@dataclass
class OptimizerConfig:
    lr: float = 1e-6  # AdamW learning rate
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    clip_grad: float = 1.0  # max global gradient norm
    lr_warmup_iters: int = 0  # optimizer steps of linear warmup from 0 to lr
    lr_decay_style: str = "constant"  # after warmup: constant, linear or cosine decay to min_lr
    lr_decay_iters: int = 0  # steps (warmup included) until min_lr is reached; 0 = the whole run
    min_lr: float = 0.0  # learning rate at the end of the decay


@dataclass
class PolicyTrainerConfig:
    backend: str = "fsdp"  # training backend: fsdp or megatron
    load: str = ""  # HF model directory to train ("" = same as models.policy.load)
    dtype: str = "auto"  # training dtype: auto, float32 or bfloat16
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # optimizer settings
    packing: bool = True  # pack samples into bins of max_token_in_packing tokens
    max_token_in_packing: int = 8192  # tokens per packed bin
    meta_init: bool = False  # build the model on the meta device before loading weights
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    kl_coef: float = 0.0  # weight of the KL penalty against the reference model
    entropy_coef: float = 0.0  # weight of the entropy bonus
    pos_clip_ratio: float = 0.2  # upper clip: ratio <= 1 + pos_clip_ratio
    neg_clip_ratio: float = 0.2  # lower clip: ratio >= 1 - neg_clip_ratio
    tis_cap: Optional[float] = None  # truncated importance sampling: cap of the trainer/rollout weight (None = off)
    tis_mode: str = "truncate"  # truncate (weight = min(ratio, tis_cap)) or mask (ratio > tis_cap: weight 0)
    ulysses_sequence_parallel_size: int = 1  # devices one sequence is split over (Ulysses)
    groupgemm: bool = False  # grouped GEMM for MoE experts
    attn_implementation: str = "sdpa"  # trainer attention over packed rows: sdpa or flex_attention (block-sparse)
    torch_compile: bool = False  # compile each decoder layer with torch.compile (fused elementwise work; first steps compile)
    ref_offload: bool = False  # keep the reference model's shards in host memory between uses (GPU)
    offload: bool = False  # let the trainer move its parameter shards and optimizer state to host memory while rollout runs (Offload; GPU)
    save_hf: bool = False  # also write an HF directory (safetensors) in each checkpoint, under hf/
    # backend=megatron (Megatron-core) only; ChatLearn's names. docs/architecture.md says what each trades.
    tensor_model_parallel_size: int = 1  # ranks each layer's matmuls are split over (TP)
    pipeline_model_parallel_size: int = 1  # pipeline stages the layers are split into (PP)
    expert_model_parallel_size: int = 1  # ranks the MoE experts are dealt to (EP)
    expert_tensor_parallel_size: Optional[int] = None  # ranks each expert is split over (ETP); None = TP
    sequence_parallel: bool = False  # split norms and dropout-free regions along the sequence over TP ranks
    recompute_granularity: Optional[str] = None  # activation recompute: None, full (every layer) or selective (attention)
    moe_permute_fusion: bool = False  # Transformer Engine's fused token permutation (needs TE)
    moe_unpermute_dtype: str = "fp32"  # accumulation dtype of MoE unpermute: fp32, or native (the activations')
    moe_aux_loss_coeff: float = 0.0  # router load-balancing loss weight (0 = off: the GRPO loss alone)
    moe_router_bias_update_rate: float = 0.0  # aux-loss-free router bias updates (0 = off; needs an expert bias)
    moe_router_dtype: str = "fp32"  # router logits/softmax dtype: fp32, fp64, or native (the compute dtype)


@dataclass
class RewardConfig:
    name: str = "math"  # reward function to score responses with
    timeout_s: float = 10.0  # per-sample time limit; a sample over it scores 0 (metric reward/timeouts)
    num_workers: int = 2  # processes the coordinator scores samples in (a stuck one is killed at timeout_s)


@dataclass
class ModelsConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # the rollout engine
    policy_trainer: PolicyTrainerConfig = field(default_factory=PolicyTrainerConfig)  # the trainer
    reward: RewardConfig = field(default_factory=RewardConfig)  # the reward function


@dataclass
class RLConfig:
    runtime_args: RuntimeArgs = field(default_factory=RuntimeArgs)  # run-wide settings
    models: ModelsConfig = field(default_factory=ModelsConfig)  # per-model settings


@functools.cache
def _leaf_types(cls: type = RLConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf key -> declared type, for the schema under ``cls``."""
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        out.update(_leaf_types(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp)
                   else {prefix + name: tp})
    return out


def valid_keys() -> list[str]:
    """All dotted leaf keys of the schema, e.g. ``models.policy_trainer.optimizer.lr``."""
    return list(_leaf_types())


def _suggest(key: str) -> str | None:
    """Closest valid dotted key: by last component (key in the wrong section or misspelt leaf),
    or by the whole dotted key when that is nearly equal (misspelt section)."""
    def score(cand: str) -> tuple[float, float]:
        full = difflib.SequenceMatcher(None, key, cand).ratio()
        tail = difflib.SequenceMatcher(None, key.rsplit(".", 1)[-1], cand.rsplit(".", 1)[-1])
        return max(tail.ratio(), full if full >= 0.9 else 0.0), full

    best = max(valid_keys(), key=score)
    return best if score(best)[0] >= 0.6 else None


def _leaves(value: Any, key: str) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{key}.{k}")]
    return [key]


def _unknown_key_errors(user: Any, cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """Walk a user's plain dict against the schema; one (dotted key, message) per unknown key."""
    fields = typing.get_type_hints(cls)
    if not isinstance(user, dict):
        key = prefix.rstrip('.')
        return [(key, f"'{key}' must be a mapping with keys: {', '.join(fields)}")]
    errors: list[tuple[str, str]] = []
    for name, value in ((str(k), v) for k, v in user.items()):
        key = prefix + name
        if name in fields:
            if dataclasses.is_dataclass(fields[name]):
                errors += _unknown_key_errors(value, fields[name], key + ".")
            continue
        # name the leaves of an unknown section, so 'runtime_arg.seed' suggests 'runtime_args.seed'
        for leaf in _leaves(value, key):
            if leaf in MOVED:
                errors.append((leaf, f"config key '{leaf}' is no longer a run setting: {MOVED[leaf]}"))
                continue
            hint = _suggest(leaf)
            fix = f"did you mean '{hint}'?" if hint else f"valid keys here: {', '.join(fields)}"
            errors.append((leaf, f"unknown config key {_key_text(leaf)}; {fix}"))
    return errors


def _get(cfg: RLConfig, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


_Check = tuple[str, Callable[[Any], bool], str]


def _one_of(key: str, values: tuple[str, ...]) -> _Check:
    return key, lambda v: v in values, "one of " + ", ".join(values)


# (dotted key, predicate on the value, valid range shown in the error)
_RANGES: list[_Check] = [
    *[(f"runtime_args.{k}", lambda v: v >= 1, ">= 1") for k in (
        "num_episode", "sample_per_episode", "train_global_batch_size", "train_micro_batch_size",
        "weight_sync_bucket_mb")],
    *[(f"runtime_args.rpc_timeout_s.{f.name}", lambda v: 0 < v <= 86400, "0 < seconds <= 86400 (a day)")
      for f in dataclasses.fields(RpcTimeouts)],
    ("runtime_args.num_inference_per_prompt", lambda v: v >= 2, ">= 2 (GRPO normalises a group)"),
    ("runtime_args.agreement_samples", lambda v: v >= 0, ">= 0"),
    ("runtime_args.save_episode_interval", lambda v: v >= 0, ">= 0 (0 = never)"),
    ("runtime_args.eval_episode_interval", lambda v: v >= 0, ">= 0 (0 = only before the first and after the last episode)"),
    ("runtime_args.exp_name", lambda v: re.fullmatch(EXP_NAME_PATTERN, v) is not None,
     "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (it names a directory)"),
    ("runtime_args.step_retries", lambda v: v >= 0, ">= 0"),
    _one_of("runtime_args.placement", PLACEMENTS),
    ("runtime_args.off_policy_steps", lambda v: v >= 0, ">= 0 (0 = synchronous)"),
    ("runtime_args.trainer_restarts", lambda v: v >= 0, ">= 0 (0 = a run that loses its trainer fails)"),
    ("runtime_args.trainer_restart_wait_s", lambda v: 0 < v <= 86400, "0 < seconds <= 86400 (a day)"),
    ("runtime_args.logprob_diff_threshold", lambda v: v > 0, "> 0"),
    _one_of("models.policy.engine", ENGINES),
    _one_of("models.policy.dtype", ROLLOUT_DTYPES),
    *[(f"models.policy.{k}", lambda v: v >= 1, ">= 1") for k in (
        "tensor_model_parallel_size", "max_prompt_tokens_length", "max_response_tokens_length",
        "max_num_seqs")],
    ("models.policy.gpu_memory_utilization", lambda v: 0 < v <= 1, "0 < value <= 1"),
    ("models.policy.temperature", lambda v: TEMPERATURE_RANGE[0] <= v <= TEMPERATURE_RANGE[1],
     f"{TEMPERATURE_RANGE[0]} <= value <= {TEMPERATURE_RANGE[1]}"),
    ("models.policy.top_p", lambda v: 0 < v <= 1, "0 < value <= 1"),
    ("models.policy.top_k", lambda v: v == -1 or v >= 1, "-1 (off) or >= 1"),
    _one_of("models.policy_trainer.backend", BACKENDS),
    _one_of("models.policy_trainer.dtype", TRAINER_DTYPES),
    _one_of("models.policy_trainer.attn_implementation", TRAINER_ATTENTION),
    ("models.policy_trainer.optimizer.lr", lambda v: v > 0, "> 0"),
    _one_of("models.policy_trainer.optimizer.lr_decay_style", LR_DECAY_STYLES),
    *[(f"models.policy_trainer.optimizer.{k}", lambda v: v >= 0, ">= 0") for k in (
        "lr_warmup_iters", "lr_decay_iters", "min_lr")],
    ("models.policy_trainer.max_token_in_packing", lambda v: v >= 1, ">= 1"),
    ("models.policy_trainer.ulysses_sequence_parallel_size", lambda v: v >= 1 and not v & (v - 1),
     "a power of two (1, 2, 4, 8, ...) dividing the trainer's GPUs per node and the model's heads"),
    *[(f"models.policy_trainer.{k}", lambda v: v >= 0, ">= 0") for k in (
        "kl_coef", "entropy_coef", "pos_clip_ratio", "neg_clip_ratio", "moe_aux_loss_coeff",
        "moe_router_bias_update_rate")],
    *[(f"models.policy_trainer.{k}", lambda v: v >= 1, ">= 1") for k in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")],
    ("models.policy_trainer.expert_tensor_parallel_size", lambda v: v is None or v >= 1,
     ">= 1, or null (= tensor_model_parallel_size)"),
    ("models.policy_trainer.recompute_granularity", lambda v: v in RECOMPUTE, "null, full or selective"),
    _one_of("models.policy_trainer.moe_unpermute_dtype", ("fp32", "native")),
    _one_of("models.policy_trainer.moe_router_dtype", MOE_DTYPES),
    ("models.policy_trainer.tis_cap", lambda v: v is None or v >= 1,
     ">= 1 (the weight's cap; an on-policy token has weight 1), or null (off)"),
    _one_of("models.policy_trainer.tis_mode", TIS_MODES),
    ("models.reward.timeout_s", lambda v: 0 < v <= 3600, "0 < seconds <= 3600"),
    ("models.reward.num_workers", lambda v: 1 <= v <= 64, "1 <= value <= 64"),
]

# Keys that apply only to some engines, backends or modes. Set to anything but the default where
# it does not apply, a key would be accepted and ignored: that is an error instead.
# (dotted key, does it apply to this config?, where it applies and why)
def _backend_is(backend: str) -> Callable[[RLConfig], bool]:
    return lambda c: c.models.policy_trainer.backend == backend


APPLIES_ONLY: list[tuple[str, Callable[[RLConfig], bool], str]] = [
    # keys that one trainer backend reads
    *[(f"models.policy_trainer.{k}", _backend_is("megatron"), "with models.policy_trainer.backend=megatron")
      for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                "expert_tensor_parallel_size", "sequence_parallel", "moe_permute_fusion", "moe_unpermute_dtype",
                "moe_aux_loss_coeff", "moe_router_bias_update_rate", "moe_router_dtype")],
    ("models.policy_trainer.recompute_granularity", _backend_is("megatron"),
     "with models.policy_trainer.backend=megatron; with fsdp use models.policy_trainer.gradient_checkpointing=True"),
    ("models.policy_trainer.gradient_checkpointing", _backend_is("fsdp"),
     "with models.policy_trainer.backend=fsdp; with megatron use models.policy_trainer.recompute_granularity=full"),
    ("models.policy_trainer.ulysses_sequence_parallel_size", _backend_is("fsdp"),
     "with models.policy_trainer.backend=fsdp; with megatron use models.policy_trainer.sequence_parallel"),
    ("models.policy_trainer.attn_implementation", _backend_is("fsdp"),
     "with models.policy_trainer.backend=fsdp (megatron runs packed rows through FlashAttention's varlen kernel)"),
    *[(f"models.policy_trainer.{k}", _backend_is("fsdp"), "with models.policy_trainer.backend=fsdp")
      for k in ("torch_compile", "ref_offload")],
    # keys of one engine or mode
    ("models.policy.gpu_memory_utilization", lambda c: c.models.policy.engine == "vllm",
     "with models.policy.engine=vllm (the built-in engine sizes its KV cache per batch)"),
    ("models.policy.enable_sleep_mode", lambda c: c.models.policy.engine == "vllm",
     "with models.policy.engine=vllm (the built-in engine can always sleep)"),
    ("runtime_args.train_micro_batch_size", lambda c: not c.models.policy_trainer.packing,
     "with models.policy_trainer.packing=False (packed micro-batches are sized by "
     "models.policy_trainer.max_token_in_packing)"),
    ("models.policy_trainer.max_token_in_packing", lambda c: c.models.policy_trainer.packing,
     "with models.policy_trainer.packing=True (padded micro-batches hold runtime_args.train_micro_batch_size "
     "samples)"),
    ("models.policy_trainer.tis_mode", lambda c: c.models.policy_trainer.tis_cap is not None,
     "with models.policy_trainer.tis_cap set (truncated importance sampling is off without it)"),
    ("models.policy_trainer.ref_offload", lambda c: c.models.policy_trainer.kl_coef > 0,
     "with models.policy_trainer.kl_coef > 0 (only the KL term uses a reference model)"),
    ("models.policy_trainer.save_hf", lambda c: c.runtime_args.save_episode_interval > 0,
     "with runtime_args.save_episode_interval > 0 (the HF directory is written into each checkpoint)"),
    ("runtime_args.trainer_restart_wait_s", lambda c: c.runtime_args.trainer_restarts > 0,
     "with runtime_args.trainer_restarts > 0 (0: a run that loses its trainer fails at once)"),
    ("runtime_args.logprob_diff_threshold", lambda c: c.runtime_args.agreement_samples > 0,
     "with runtime_args.agreement_samples > 0 (0 turns the agreement check off)"),
    *[(f"models.policy_trainer.optimizer.{k}",
       lambda c: c.models.policy_trainer.optimizer.lr_decay_style != "constant",
       "with models.policy_trainer.optimizer.lr_decay_style=linear or cosine (a constant LR has no decay)")
      for k in ("lr_decay_iters", "min_lr")],
]

# Keys that left the run config, with where their setting lives now.
MOVED = {
    "runtime_args.grpc_max_message_mb": "the gRPC message limit is a deployment setting that every sender and "
                                        "receiver must share: start every service with --max-message-mb "
                                        "(or RLGRID_GRPC_MAX_MESSAGE_MB)",
}

# Accepted by the schema but not implemented yet: delete a row when its feature lands.
# (dotted key, predicate on (value, whole config), message with {key} {value} {backend} filled in)
NOT_IMPLEMENTED: list[tuple[str, Callable[[Any, RLConfig], bool], str]] = [
    ("models.policy.tensor_model_parallel_size",
     lambda v, c: v > 1 and c.models.policy.engine == "builtin",
     "{key}={value}: the built-in engine runs one device; use models.policy.engine=vllm"),
]


def _consistency_errors(cfg: RLConfig) -> list[str]:
    pol, tr = cfg.models.policy, cfg.models.policy_trainer
    spe, gbs = "runtime_args.sample_per_episode", "runtime_args.train_global_batch_size"
    n, mbs = "runtime_args.num_inference_per_prompt", "runtime_args.train_micro_batch_size"
    divisible = [  # (dividend key, divisor key, check applies, why)
        (spe, n, True, ""),
        (spe, gbs, True, ""),
        (gbs, n, True, " (a group must not span optimizer steps)"),
        (gbs, mbs, not tr.packing, " when models.policy_trainer.packing=False"),
    ]
    errors = [f"{a}={_get(cfg, a)} must be divisible by {b}={_get(cfg, b)}{why}"
              for a, b, applies, why in divisible if applies and _get(cfg, a) % _get(cfg, b)]
    if pol.engine == "vllm" and (pol.top_p < 1.0 or pol.top_k > 0):
        errors.append(f"models.policy.top_p={pol.top_p} / models.policy.top_k={pol.top_k} are not supported with "
                      "models.policy.engine=vllm (its logprobs would be those of the filtered distribution, "
                      "which the trainer's cannot match); use models.policy.top_p=1.0 and models.policy.top_k=-1")
    if tr.backend == "megatron" and tr.sequence_parallel and tr.tensor_model_parallel_size == 1:
        errors.append("models.policy_trainer.sequence_parallel=True splits the sequence over tensor-parallel ranks; "
                      "it needs models.policy_trainer.tensor_model_parallel_size > 1")
    if cfg.runtime_args.eval_episode_interval and not cfg.runtime_args.eval_data_path:
        errors.append(f"runtime_args.eval_episode_interval={cfg.runtime_args.eval_episode_interval} needs "
                      "runtime_args.eval_data_path (the held-out prompts); set it, or leave the interval at 0")
    if cfg.runtime_args.placement == "colocated" and cfg.runtime_args.off_policy_steps > 0:
        errors.append(f"runtime_args.off_policy_steps={cfg.runtime_args.off_policy_steps} overlaps rollout and "
                      "training, which runtime_args.placement=colocated runs in turns (each hands its GPU memory to "
                      "the other); use placement=disaggregated (or auto) or off_policy_steps=0")
    sample_len = pol.max_prompt_tokens_length + pol.max_response_tokens_length
    if tr.packing and tr.max_token_in_packing < sample_len:
        errors.append(f"models.policy_trainer.max_token_in_packing={tr.max_token_in_packing}"
                      " must be >= models.policy.max_prompt_tokens_length"
                      f" + models.policy.max_response_tokens_length = {sample_len}"
                      " (one sample must fit a bin)")
    return errors


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _validate(cfg: RLConfig) -> None:
    """Ranges first (later checks divide by them), then cross-field, then keys set where they do not
    apply (APPLIES_ONLY), then NOT_IMPLEMENTED."""
    errors = [f"{k} is invalid; must be a finite number"
              for k in _leaf_types() if not _finite(_get(cfg, k))]
    errors += [f"{k}{_shown(_get(cfg, k))} is invalid; must be {desc}"
               for k, ok, desc in _RANGES if _finite(_get(cfg, k)) and not ok(_get(cfg, k))]
    if not errors:
        errors = _consistency_errors(cfg)
    if not errors:
        defaults = RLConfig()
        errors = [f"{k} is set but applies only {where}; remove it (the default is {_get(defaults, k)!r})"
                  for k, applies, where in APPLIES_ONLY if _get(cfg, k) != _get(defaults, k) and not applies(cfg)]
    if not errors:
        backend = cfg.models.policy_trainer.backend
        errors = [msg.format(key=k, value=_get(cfg, k), backend=backend)
                  for k, pred, msg in NOT_IMPLEMENTED if pred(_get(cfg, k), cfg)]
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


# ---- parsing: client-sent text is data --------------------------------------------------------------
# Whatever a client sends (config_yaml, overrides, a file it names) is parsed, never evaluated: an
# OmegaConf interpolation `${...}` (`${oc.env:HOME}` would read the server's environment) is refused,
# and so are YAML anchors/aliases. No error repeats a value or a line of the text: it names the key and
# the line/column, so a file read by mistake never comes back in a message.

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,100}")
_INTERPOLATION = "${"
_YAML_TOKEN = re.compile(r"[^\w\s]{1,3}|<[\w ]+>")   # what a YAML error may quote: ',' ']' '<scalar>'
Marks = dict[str, tuple[int, int]]   # dotted key -> (line, column), 1-based, of a YAML text


def _key_text(key: str) -> str:
    """A key as errors show it: quoted when it looks like a key, else not at all (it may be file content)."""
    return f"'{key}'" if _PLAIN_KEY.fullmatch(key) else "(a key that is not a config key name)"


def _shown(value: Any) -> str:
    """`=value` for numbers (an error may show them), nothing for strings (they are not echoed)."""
    return f"={value!r}" if isinstance(value, (bool, int, float)) else ""


def _where(source: str, marks: Marks, key: str) -> str:
    line_col = marks.get(key.split("[")[0])
    return f"line {line_col[0]}, column {line_col[1]} of {source}" if line_col else source


def _interpolation_error(key: str, where: str) -> ConfigError:
    return ConfigError(f"{_key_text(key)} ({where}): '${{...}}' is OmegaConf interpolation, which rlgrid never "
                       f"resolves in a config a client sends; write the value itself")


def _yaml_error(e: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    # the parser's own words, minus anything it quotes from the text
    problem = re.sub(r"'([^']*)'", lambda m: m[0] if _YAML_TOKEN.fullmatch(m[1]) else "'...'",
                     getattr(e, "problem", None) or "syntax error")
    return ConfigError(f"invalid YAML in {source}{where}: {problem}")


# A run config nests five deep; the YAML composer (and everything after it) recurses per level, so a
# deeper text is refused from the parser's event stream first, which does not recurse.
MAX_YAML_DEPTH = 16


def _check_depth(text: str, source: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{source} nests deeper than {MAX_YAML_DEPTH} levels at line "
                                  f"{event.start_mark.line + 1}, column {event.start_mark.column + 1}; "
                                  f"a run config nests at most a few")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _scan_yaml(text: str, source: str) -> Marks:
    """Locates every key of a YAML text and refuses interpolation and aliases; values stay unread."""
    try:
        _check_depth(text, source)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source) from None
    marks: Marks = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, key: str) -> None:
        if id(node) in seen:   # the composer hands out an anchored node again for each alias
            raise ConfigError(f"{source} line {node.start_mark.line + 1}: YAML anchors and aliases (&name, *name, "
                              f"<<) are not accepted in an rlgrid config; write each value out")
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                name = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                child = f"{key}.{name}" if key else name
                marks.setdefault(child, (k.start_mark.line + 1, k.start_mark.column + 1))
                if _INTERPOLATION in name:
                    raise _interpolation_error(child, _where(source, marks, child))
                walk(v, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, f"{key}[{i}]")
        elif _INTERPOLATION in str(node.value):
            raise _interpolation_error(key, f"line {node.start_mark.line + 1}, column "
                                            f"{node.start_mark.column + 1} of {source}")

    if root is not None:
        walk(root, "")
    return marks


def _parse_yaml(text: str, source: str) -> tuple[DictConfig, Marks]:
    marks = _scan_yaml(text, source)
    try:
        node = OmegaConf.create(text)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source) from None
    except AssertionError:  # OmegaConf.create asserts on a top-level scalar such as "3"
        node = None
    except OmegaConfBaseException:
        raise ConfigError(f"{source} could not be read as a config (a mapping of keys to values)") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{source} must be a YAML mapping (runtime_args: ..., models: ...)")
    return node, marks


def _parse_override(i: int, override: str) -> tuple[str, DictConfig]:
    key, eq, _ = override.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"overrides[{i}] ({_key_text(key)}) must look like dotted.key=value")
    if _INTERPOLATION in override:
        raise _interpolation_error(key, f"overrides[{i}]")
    try:
        return key, OmegaConf.from_dotlist([override])
    except (yaml.YAMLError, OmegaConfBaseException):
        raise ConfigError(f"overrides[{i}] ({_key_text(key)}): the value is not valid YAML") from None


def load_config(yaml_text: str | None = None, overrides: Sequence[str] = (), *,
                path: str | None = None, source: str | None = None) -> RLConfig:
    """Build the run config: schema defaults < YAML (``yaml_text`` or ``path``) < ``overrides``.

    ``overrides`` are ChatLearn-style ``dotted.key=value`` strings, e.g. ``runtime_args.seed=1``.
    ``source`` names the YAML in errors (default: the path, or "config text"). The text is data:
    ``${...}`` interpolation is refused, and no error repeats a value or a line of it.
    """
    if yaml_text is not None and path is not None:
        raise ConfigError("pass either yaml_text or path, not both")
    layers: list[tuple[str, DictConfig, Marks]] = []
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                yaml_text = f.read(MAX_CONFIG_CHARS + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path!r}: {getattr(e, 'strerror', None) or 'not UTF-8'}"
                              ) from None
    if len(yaml_text or "") > MAX_CONFIG_CHARS or sum(len(o) for o in overrides) > MAX_CONFIG_CHARS:
        raise ConfigError(f"the config (YAML and overrides) may hold at most {MAX_CONFIG_CHARS} characters each; "
                          f"a run config is a few KiB")
    source = source or path or "config text"
    if yaml_text is not None:
        layers.append((source, *_parse_yaml(yaml_text, source)))
    set_by_override: dict[str, int] = {}
    for i, override in enumerate(overrides):
        key, layer = _parse_override(i, override)
        set_by_override[key] = i
        layers.append((f"overrides[{i}]", layer, {}))

    errors = [f"{msg} ({_where(src, marks, key)})" for src, layer, marks in layers
              for key, msg in _unknown_key_errors(OmegaConf.to_container(layer), RLConfig)]
    if errors:
        raise ConfigError("\n".join(errors))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RLConfig), *(layer for _, layer, _ in layers))
        cfg = typing.cast(RLConfig, OmegaConf.to_object(merged))
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", None) or "")
        tp = _leaf_types().get(key.split("[")[0])
        want = f"expected {tp if typing.get_origin(tp) else tp.__name__}" if tp else "invalid value"
        src, marks = next(((s, m) for s, _, m in reversed(layers) if key.split("[")[0] in m), (None, {}))
        i = set_by_override.get(key.split("[")[0])
        where = f"overrides[{i}]" if i is not None else (_where(src, marks, key) if src else "")
        raise ConfigError(f"invalid value for {_key_text(key) if key else 'a key'}"
                          f"{f' ({where})' if where else ''}: {want}") from None

    if not cfg.models.policy_trainer.load:
        cfg.models.policy_trainer.load = cfg.models.policy.load
    _validate(cfg)
    return cfg


def config_to_dict(cfg: RLConfig) -> dict[str, Any]:
    """Plain nested dict of the config (for logging and for sending to services)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: RLConfig) -> str:
    """YAML text of the config; ``load_config(config_to_yaml(cfg)) == cfg``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
