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
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ENGINES = ("builtin", "vllm")
BACKENDS = ("fsdp", "megatron")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
ROLLOUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAINER_DTYPES = ("auto", "float32", "bfloat16")
TRAINER_ATTENTION = ("sdpa", "flex_attention")
EXP_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


class ConfigError(ValueError):
    """Invalid run configuration; the message names the dotted key(s) and the fix."""


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
    grpc_max_message_mb: int = 64  # largest gRPC message the services accept (MiB)
    step_retries: int = 1  # how often a failed rollout is retried on other replicas
    resume_from: str = ""  # a checkpoint-<episode> directory of an earlier run to continue from ("" = fresh)


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
    ulysses_sequence_parallel_size: int = 1  # devices one sequence is split over (Ulysses)
    groupgemm: bool = False  # grouped GEMM for MoE experts
    attn_implementation: str = "sdpa"  # trainer attention over packed rows: sdpa or flex_attention (block-sparse)
    torch_compile: bool = False  # compile each decoder layer with torch.compile (fused elementwise work; first steps compile)
    ref_offload: bool = False  # keep the reference model's shards in host memory between uses (GPU)
    save_hf: bool = False  # also write an HF directory (safetensors) in each checkpoint, under hf/


@dataclass
class RewardConfig:
    name: str = "math"  # reward function to score responses with


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


def _unknown_key_errors(user: Any, cls: type, prefix: str = "") -> list[str]:
    """Walk a user's plain dict against the schema; one message per unknown key."""
    fields = typing.get_type_hints(cls)
    if not isinstance(user, dict):
        return [f"'{prefix.rstrip('.')}' must be a mapping with keys: {', '.join(fields)}"]
    errors: list[str] = []
    for name, value in ((str(k), v) for k, v in user.items()):
        key = prefix + name
        if name in fields:
            if dataclasses.is_dataclass(fields[name]):
                errors += _unknown_key_errors(value, fields[name], key + ".")
            continue
        # name the leaves of an unknown section, so 'runtime_arg.seed' suggests 'runtime_args.seed'
        for leaf in _leaves(value, key):
            hint = _suggest(leaf)
            fix = f"did you mean '{hint}'?" if hint else f"valid keys here: {', '.join(fields)}"
            errors.append(f"unknown config key '{leaf}'; {fix}")
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
        "weight_sync_bucket_mb", "grpc_max_message_mb")],
    ("runtime_args.num_inference_per_prompt", lambda v: v >= 2, ">= 2 (GRPO normalises a group)"),
    ("runtime_args.agreement_samples", lambda v: v >= 0, ">= 0"),
    ("runtime_args.save_episode_interval", lambda v: v >= 0, ">= 0 (0 = never)"),
    ("runtime_args.eval_episode_interval", lambda v: v >= 0, ">= 0 (0 = only before the first and after the last episode)"),
    ("runtime_args.exp_name", lambda v: re.fullmatch(EXP_NAME_PATTERN, v) is not None,
     "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (it names a directory)"),
    ("runtime_args.step_retries", lambda v: v >= 0, ">= 0"),
    ("runtime_args.logprob_diff_threshold", lambda v: v > 0, "> 0"),
    _one_of("models.policy.engine", ENGINES),
    _one_of("models.policy.dtype", ROLLOUT_DTYPES),
    *[(f"models.policy.{k}", lambda v: v >= 1, ">= 1") for k in (
        "tensor_model_parallel_size", "max_prompt_tokens_length", "max_response_tokens_length",
        "max_num_seqs")],
    ("models.policy.gpu_memory_utilization", lambda v: 0 < v <= 1, "0 < value <= 1"),
    ("models.policy.temperature", lambda v: v > 0, "> 0"),
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
        "kl_coef", "entropy_coef", "pos_clip_ratio", "neg_clip_ratio")],
]

# Accepted by the schema but not implemented yet: delete a row when its feature lands.
# (dotted key, predicate on (value, whole config), message with {key} {value} {backend} filled in)
NOT_IMPLEMENTED: list[tuple[str, Callable[[Any, RLConfig], bool], str]] = [
    ("models.policy_trainer.backend", lambda v, c: v == "megatron",
     "{key}={value}: trainer backend 'megatron' not implemented yet; use {key}=fsdp"),
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
    if cfg.runtime_args.eval_episode_interval and not cfg.runtime_args.eval_data_path:
        errors.append(f"runtime_args.eval_episode_interval={cfg.runtime_args.eval_episode_interval} needs "
                      "runtime_args.eval_data_path (the held-out prompts); set it, or leave the interval at 0")
    sample_len = pol.max_prompt_tokens_length + pol.max_response_tokens_length
    if tr.packing and tr.max_token_in_packing < sample_len:
        errors.append(f"models.policy_trainer.max_token_in_packing={tr.max_token_in_packing}"
                      " must be >= models.policy.max_prompt_tokens_length"
                      f" + models.policy.max_response_tokens_length = {sample_len}"
                      " (one sample must fit a bin)")
    return errors


def _validate(cfg: RLConfig) -> None:
    """Ranges first (later checks divide by them), then cross-field, then NOT_IMPLEMENTED."""
    errors = [f"{k}={_get(cfg, k)!r} is invalid; must be {desc}"
              for k, ok, desc in _RANGES if not ok(_get(cfg, k))]
    if not errors:
        errors = _consistency_errors(cfg)
    if not errors:
        backend = cfg.models.policy_trainer.backend
        errors = [msg.format(key=k, value=_get(cfg, k), backend=backend)
                  for k, pred, msg in NOT_IMPLEMENTED if pred(_get(cfg, k), cfg)]
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _parse_yaml(text: str, source: str) -> DictConfig:
    try:
        node = OmegaConf.create(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {source}: {e}") from None
    except AssertionError:  # OmegaConf.create asserts on a top-level scalar such as "3"
        node = None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{source} must be a YAML mapping (runtime_args: ..., models: ...)")
    return node


def load_config(yaml_text: str | None = None, overrides: Sequence[str] = (), *,
                path: str | None = None) -> RLConfig:
    """Build the run config: schema defaults < YAML (``yaml_text`` or ``path``) < ``overrides``.

    ``overrides`` are ChatLearn-style ``dotted.key=value`` strings, e.g. ``runtime_args.seed=1``.
    """
    if yaml_text is not None and path is not None:
        raise ConfigError("pass either yaml_text or path, not both")
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                yaml_text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e.strerror}") from None
    if yaml_text is not None:
        layers.append((path or "config text", _parse_yaml(yaml_text, path or "config text")))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like dotted.key=value, got {bad}")
    try:
        layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from None

    errors = [f"{err} (in {source})" for source, layer in layers
              for err in _unknown_key_errors(OmegaConf.to_container(layer), RLConfig)]
    if errors:
        raise ConfigError("\n".join(errors))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RLConfig), *(layer for _, layer in layers))
        cfg = typing.cast(RLConfig, OmegaConf.to_object(merged))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "<unknown>"
        tp = _leaf_types().get(key.split("[")[0])
        want = f"expected {tp if typing.get_origin(tp) else tp.__name__}" if tp else "invalid value"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"invalid value for '{key}': {want} ({reason})") from None

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
