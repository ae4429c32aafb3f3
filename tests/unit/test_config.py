"""Tests for services.common.config: loading, merging and validation of the run config."""

from pathlib import Path

import pytest

from services.common.config import (
    APPLIES_ONLY,
    NOT_IMPLEMENTED,
    ConfigError,
    RLConfig,
    config_to_dict,
    config_to_yaml,
    load_config,
    valid_keys,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def error_of(yaml_text: str | None = None, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(yaml_text, overrides)
    return str(info.value)


def test_defaults_load_as_typed_dataclasses() -> None:
    cfg = load_config()
    assert isinstance(cfg, RLConfig)
    assert cfg.runtime_args.num_episode == 20
    assert cfg.models.policy.engine == "builtin"
    assert cfg.models.policy.stop_token_ids == []
    assert cfg.models.policy_trainer.optimizer.lr == 1e-6
    assert cfg.models.reward.name == "math"
    assert config_to_dict(cfg)["models"]["policy_trainer"]["optimizer"]["clip_grad"] == 1.0


def test_valid_keys_are_dotted_leaves() -> None:
    keys = valid_keys()
    assert "models.policy_trainer.optimizer.lr" in keys
    assert "runtime_args.step_retries" in keys
    assert "models.policy_trainer.optimizer" not in keys


def test_merge_order_defaults_then_yaml_then_overrides() -> None:
    yaml_text = "runtime_args:\n  num_episode: 5\n  seed: 7\nmodels:\n  policy:\n    top_k: 3\n"
    overrides = ["runtime_args.num_episode=9", "models.policy.stop_token_ids=[1,2]"]
    cfg = load_config(yaml_text, overrides)
    assert cfg.runtime_args.num_episode == 9  # override beats yaml
    assert cfg.runtime_args.seed == 7  # yaml beats default
    assert cfg.models.policy.top_k == 3
    assert cfg.models.policy.stop_token_ids == [1, 2]
    assert cfg.runtime_args.sample_per_episode == 64  # default untouched


def test_load_from_path(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("runtime_args:\n  exp_name: from_file\n")
    cfg = load_config(path=str(path), overrides=["runtime_args.seed=3"])
    assert (cfg.runtime_args.exp_name, cfg.runtime_args.seed) == ("from_file", 3)


def test_chatlearn_true_false_override_strings() -> None:
    cfg = load_config(overrides=["models.policy_trainer.packing=False",
                                 "models.policy.enforce_eager=True",
                                 "runtime_args.data_shuffle=False"])
    assert cfg.models.policy_trainer.packing is False
    assert cfg.models.policy.enforce_eager is True
    assert cfg.runtime_args.data_shuffle is False


def test_unknown_key_in_yaml_suggests_closest() -> None:
    msg = error_of("models:\n  policy_trainer:\n    max_tokens_in_packing: 4096\n")
    assert "'models.policy_trainer.max_tokens_in_packing'" in msg
    assert "did you mean 'models.policy_trainer.max_token_in_packing'?" in msg


def test_unknown_key_in_override_suggests_by_last_component() -> None:
    msg = error_of(overrides=("models.policy.lr=0.1",))
    assert "unknown config key 'models.policy.lr'" in msg
    assert "did you mean 'models.policy_trainer.optimizer.lr'?" in msg


def test_unknown_section_names_its_leaves() -> None:
    msg = error_of("runtime_arg:\n  seed: 1\n")
    assert "'runtime_arg.seed'" in msg and "did you mean 'runtime_args.seed'?" in msg


def test_unknown_key_without_close_match_lists_siblings() -> None:
    msg = error_of(overrides=("models.reward.foo=3",))
    assert "'models.reward.foo'" in msg and "valid keys here: name" in msg


def test_wrong_type_names_key_and_expected_type() -> None:
    msg = error_of(overrides=("runtime_args.num_episode=abc",))
    assert "'runtime_args.num_episode'" in msg and "expected int" in msg
    msg = error_of("models:\n  policy:\n    stop_token_ids: [1, x]\n")
    assert "models.policy.stop_token_ids" in msg and "list[int]" in msg
    msg = error_of("models:\n  policy: 3\n")
    assert "'models.policy' must be a mapping" in msg


def test_bad_yaml_reports_parser_line() -> None:
    msg = error_of("runtime_args:\n  num_episode: [1\n  seed: 2\n")
    assert "invalid YAML" in msg and "line" in msg


def test_malformed_override() -> None:
    assert "runtime_args.seed" in error_of(overrides=("runtime_args.seed",))


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (("runtime_args.sample_per_episode=60", "runtime_args.train_global_batch_size=12",
          "runtime_args.num_inference_per_prompt=8"),
         ("runtime_args.sample_per_episode", "runtime_args.num_inference_per_prompt")),
        (("runtime_args.sample_per_episode=64", "runtime_args.train_global_batch_size=48",
          "runtime_args.num_inference_per_prompt=8"),
         ("runtime_args.sample_per_episode", "runtime_args.train_global_batch_size")),
        (("runtime_args.sample_per_episode=64", "runtime_args.train_global_batch_size=16",
          "runtime_args.num_inference_per_prompt=32"),
         ("runtime_args.train_global_batch_size", "runtime_args.num_inference_per_prompt")),
        (("models.policy_trainer.packing=False", "runtime_args.train_micro_batch_size=24"),
         ("runtime_args.train_global_batch_size", "runtime_args.train_micro_batch_size")),
        (("runtime_args.eval_episode_interval=5",),
         ("runtime_args.eval_episode_interval", "runtime_args.eval_data_path")),
        (("models.policy_trainer.max_token_in_packing=1000",),
         ("models.policy_trainer.max_token_in_packing", "models.policy.max_prompt_tokens_length",
          "models.policy.max_response_tokens_length")),
    ],
)
def test_inconsistent_values_name_all_keys(overrides: tuple[str, ...],
                                           keys: tuple[str, ...]) -> None:
    msg = error_of(overrides=overrides)
    for key in keys:
        assert key in msg


def test_micro_batch_size_is_refused_when_packing() -> None:
    """With packing, train_micro_batch_size would be accepted and ignored: it is an error instead."""
    msg = error_of(overrides=("runtime_args.train_micro_batch_size=24",))
    assert "runtime_args.train_micro_batch_size is set but applies only with models.policy_trainer.packing=False" in msg
    cfg = load_config(overrides=["runtime_args.train_micro_batch_size=16", "models.policy_trainer.packing=False"])
    assert cfg.runtime_args.train_micro_batch_size == 16


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        (("models.policy.gpu_memory_utilization=0.5",), "models.policy.engine=vllm"),
        (("models.policy.enable_sleep_mode=True",), "models.policy.engine=vllm"),
        (("models.policy_trainer.packing=False", "models.policy_trainer.max_token_in_packing=512"),
         "models.policy_trainer.packing=True"),
        (("models.policy_trainer.ref_offload=True",), "models.policy_trainer.kl_coef > 0"),
        (("models.policy_trainer.save_hf=True",), "runtime_args.save_episode_interval > 0"),
        (("runtime_args.agreement_samples=0", "runtime_args.logprob_diff_threshold=0.1"),
         "runtime_args.agreement_samples > 0"),
        (("runtime_args.trainer_restart_wait_s=60",), "runtime_args.trainer_restarts > 0"),
        (("models.policy_trainer.optimizer.min_lr=1e-7",),
         "models.policy_trainer.optimizer.lr_decay_style=linear or cosine"),
        (("models.policy_trainer.optimizer.lr_decay_iters=10",),
         "models.policy_trainer.optimizer.lr_decay_style=linear or cosine"),
        (("models.policy_trainer.tis_mode=mask",), "models.policy_trainer.tis_cap set"),
    ],
)
def test_keys_set_where_they_do_not_apply_are_refused(overrides: tuple[str, ...], where: str) -> None:
    key = overrides[-1].split("=")[0]
    msg = error_of(overrides=overrides)
    assert f"{key} is set but applies only with {where}" in msg


# a value other than the default for each key that only one trainer backend reads
BACKEND_KEYS = {
    "megatron": ["tensor_model_parallel_size=2", "pipeline_model_parallel_size=2", "expert_model_parallel_size=2",
                 "expert_tensor_parallel_size=1", "sequence_parallel=True", "moe_permute_fusion=True",
                 "moe_unpermute_dtype=native", "moe_aux_loss_coeff=0.01", "moe_router_bias_update_rate=0.001",
                 "moe_router_dtype=fp64", "recompute_granularity=full"],
    "fsdp": ["gradient_checkpointing=True", "ulysses_sequence_parallel_size=2", "attn_implementation=flex_attention",
             "torch_compile=True", "ref_offload=True"],
}


@pytest.mark.parametrize(("backend", "setting"), [(b, k) for b, keys in BACKEND_KEYS.items() for k in keys])
def test_keys_of_the_other_trainer_backend_are_refused(backend: str, setting: str) -> None:
    other = "fsdp" if backend == "megatron" else "megatron"
    msg = error_of(overrides=(f"models.policy_trainer.backend={other}", "models.policy_trainer.kl_coef=0.1",
                              f"models.policy_trainer.{setting}"))
    assert f"models.policy_trainer.{setting.split('=')[0]} is set but applies only with " \
           f"models.policy_trainer.backend={backend}" in msg


def test_every_applies_only_row_is_tested() -> None:
    tested = {"models.policy.gpu_memory_utilization", "models.policy.enable_sleep_mode",
              "runtime_args.train_micro_batch_size",
              "models.policy_trainer.max_token_in_packing", "models.policy_trainer.ref_offload",
              "models.policy_trainer.save_hf", "runtime_args.logprob_diff_threshold",
              "models.policy_trainer.optimizer.min_lr", "models.policy_trainer.optimizer.lr_decay_iters",
              "models.policy_trainer.tis_mode", "runtime_args.trainer_restart_wait_s"}
    tested |= {f"models.policy_trainer.{k.split('=')[0]}" for keys in BACKEND_KEYS.values() for k in keys}
    assert {key for key, _, _ in APPLIES_ONLY} == tested


def test_keys_where_they_apply_or_at_their_default_load() -> None:
    cfg = load_config(overrides=["models.policy.engine=vllm", "models.policy.gpu_memory_utilization=0.5",
                                 "models.policy_trainer.kl_coef=0.1", "models.policy_trainer.ref_offload=True",
                                 "models.policy_trainer.optimizer.lr_decay_style=cosine",
                                 "models.policy_trainer.optimizer.min_lr=1e-7",
                                 "models.policy.gpu_memory_utilization=0.5"])
    assert cfg.models.policy.gpu_memory_utilization == 0.5 and cfg.models.policy_trainer.ref_offload
    load_config(overrides=["models.policy.gpu_memory_utilization=0.8"])   # the default, with the built-in engine
    cfg = load_config(overrides=["runtime_args.trainer_restarts=2", "runtime_args.trainer_restart_wait_s=60"])
    assert (cfg.runtime_args.trainer_restarts, cfg.runtime_args.trainer_restart_wait_s) == (2, 60)
    assert "runtime_args.trainer_restarts=-1 is invalid" in error_of(overrides=("runtime_args.trainer_restarts=-1",))


def test_grpc_max_message_mb_moved_to_the_services() -> None:
    msg = error_of(overrides=("runtime_args.grpc_max_message_mb=128",))
    assert "'runtime_args.grpc_max_message_mb' is no longer a run setting" in msg and "--max-message-mb" in msg


@pytest.mark.parametrize("override", ["models.policy_trainer.kl_coef=inf", "models.policy.temperature=nan",
                                      "models.reward.timeout_s=inf", "runtime_args.logprob_diff_threshold=inf"])
def test_non_finite_floats_are_refused(override: str) -> None:
    assert f"{override.split('=')[0]} is invalid; must be a finite number" in error_of(overrides=(override,))


def test_rpc_timeouts_are_keys_with_ranges() -> None:
    cfg = load_config(overrides=["runtime_args.rpc_timeout_s.generate=5"])
    assert cfg.runtime_args.rpc_timeout_s.generate == 5.0 and cfg.runtime_args.rpc_timeout_s.train == 1800.0
    assert "runtime_args.rpc_timeout_s.train" in error_of(overrides=("runtime_args.rpc_timeout_s.train=0",))
    assert "did you mean 'runtime_args.rpc_timeout_s.generate'" in error_of(
        overrides=("runtime_args.rpc_timeout_s.generat=5",))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("models.policy.temperature=0", ["models.policy.temperature", "0.01 <= value <= 100.0"]),
        ("models.policy.temperature=1000", ["models.policy.temperature", "0.01 <= value <= 100.0"]),
        ("models.policy.top_p=1.5", ["models.policy.top_p", "0 < value <= 1"]),
        ("models.policy.top_k=0", ["models.policy.top_k", "-1 (off) or >= 1"]),
        ("runtime_args.num_inference_per_prompt=1",
         ["runtime_args.num_inference_per_prompt", ">= 2"]),
        ("models.policy_trainer.optimizer.lr=0", ["models.policy_trainer.optimizer.lr", "> 0"]),
        ("models.policy.engine=sglang", ["models.policy.engine", "builtin, vllm"]),
        ("models.policy_trainer.dtype=float16",
         ["models.policy_trainer.dtype", "auto, float32, bfloat16"]),
        ("models.policy_trainer.attn_implementation=flash_attention_2",
         ["models.policy_trainer.attn_implementation", "sdpa, flex_attention"]),
        ("runtime_args.eval_episode_interval=-1", ["runtime_args.eval_episode_interval", ">= 0"]),
        ("runtime_args.exp_name=../escape", ["runtime_args.exp_name", "names a directory"]),
        ("runtime_args.exp_name=a/b", ["runtime_args.exp_name", "letters, digits"]),
        ("runtime_args.exp_name=''", ["runtime_args.exp_name", "1-64"]),
        (f"runtime_args.exp_name={'x' * 65}", ["runtime_args.exp_name", "1-64"]),
        ("runtime_args.placement=shared", ["runtime_args.placement", "auto, colocated, disaggregated"]),
        ("runtime_args.off_policy_steps=-1", ["runtime_args.off_policy_steps", ">= 0"]),
        ("models.policy_trainer.tis_cap=0.5", ["models.policy_trainer.tis_cap", ">= 1"]),
        ("models.policy_trainer.tis_mode=clip", ["models.policy_trainer.tis_mode", "truncate, mask"]),
    ],
)
def test_range_errors_name_key_and_range(override: str, expected: list[str]) -> None:
    msg = error_of(overrides=(override,))
    for part in expected:
        assert part in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (("models.policy.tensor_model_parallel_size=2",),
         "models.policy.tensor_model_parallel_size=2: the built-in engine runs one device; "
         "use models.policy.engine=vllm"),
    ],
)
def test_not_implemented_rows_raise(override: tuple[str, ...], expected: str) -> None:
    assert expected in error_of(overrides=override)


def test_every_not_implemented_row_is_tested() -> None:
    tested = {"models.policy.tensor_model_parallel_size"}
    assert {key for key, _, _ in NOT_IMPLEMENTED} == tested


def test_evaluation_keys() -> None:
    cfg = load_config(overrides=["runtime_args.eval_data_path=/data/eval.jsonl", "runtime_args.eval_episode_interval=5",
                                 "runtime_args.exp_name=gsm8k_run-2.1"])
    assert cfg.runtime_args.eval_episode_interval == 5 and cfg.runtime_args.exp_name == "gsm8k_run-2.1"


@pytest.mark.parametrize("name", ["demo_cpu.yaml", "qwen3_gsm8k_gpu.yaml", "smollm2_arithmetic_cpu.yaml",
                                  "smollm2_arithmetic_gpu.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(path=str(CONFIGS / name))
    assert cfg.models.policy.load
    assert cfg.models.policy_trainer.load == cfg.models.policy.load
    assert load_config(config_to_yaml(cfg)) == cfg


def test_shipped_config_values() -> None:
    demo = load_config(path=str(CONFIGS / "demo_cpu.yaml"))
    assert demo.models.reward.name == "toy_echo"
    assert demo.models.policy_trainer.optimizer.lr == 0.01
    assert demo.runtime_args.logprob_diff_threshold == 0.001
    gpu = load_config(path=str(CONFIGS / "qwen3_gsm8k_gpu.yaml"))
    assert gpu.models.policy.load == "/models/Qwen3-1.7B"
    assert gpu.models.policy_trainer.optimizer.lr == 1e-6
    assert gpu.models.policy_trainer.dtype == "bfloat16"


def test_yaml_round_trip_with_non_defaults() -> None:
    cfg = load_config(overrides=["models.policy.stop_token_ids=[5,6]", "runtime_args.seed=3",
                                 "models.policy.load=/m", "models.policy_trainer.packing=False"])
    again = load_config(config_to_yaml(cfg))
    assert again == cfg
    assert again.models.policy.stop_token_ids == [5, 6]


def test_trainer_load_defaults_to_policy_load() -> None:
    cfg = load_config(overrides=["models.policy.load=/models/a"])
    assert cfg.models.policy_trainer.load == "/models/a"
    cfg = load_config(overrides=["models.policy.load=/models/a",
                                 "models.policy_trainer.load=/models/b"])
    assert cfg.models.policy_trainer.load == "/models/b"


def test_vllm_engine_is_accepted_with_tensor_parallelism() -> None:
    cfg = load_config(overrides=["models.policy.engine=vllm", "models.policy.tensor_model_parallel_size=2",
                                 "models.policy.enforce_eager=True"])
    assert cfg.models.policy.engine == "vllm" and cfg.models.policy.tensor_model_parallel_size == 2


@pytest.mark.parametrize("override", ["models.policy.top_p=0.9", "models.policy.top_k=20"])
def test_vllm_refuses_filtered_sampling_naming_the_keys(override: str) -> None:
    msg = error_of(overrides=("models.policy.engine=vllm", override))
    assert "models.policy.top_p" in msg and "models.policy.top_k" in msg and "engine=vllm" in msg
    load_config(overrides=[override])   # the built-in engine reports unfiltered logprobs: fine there


# ---- client-sent text is data: nothing resolved, nothing echoed ------------------------------------

SECRET = "s3cret-value-0x5eed"


@pytest.mark.parametrize("text,key", [
    ("runtime_args:\n  exp_name: ${oc.env:HOME}\n", "'runtime_args.exp_name' (line 2, column 13"),
    ("models:\n  policy:\n    load: /m/${oc.env:RLGRID_TEST_SECRET}\n", "'models.policy.load' (line 3, column 11"),
    ("models:\n  policy:\n    stop_token_ids: [1, '${x}']\n", "'models.policy.stop_token_ids[1]'"),
    ("runtime_args:\n  exp_name: '\\${escaped}'\n", "'runtime_args.exp_name'"),
    ("runtime_args:\n  ${oc.env:HOME}: 1\n", "(a key that is not a config key name) (line 2, column 3"),
])
def test_interpolation_in_yaml_is_refused_naming_the_key(text, key, monkeypatch):
    monkeypatch.setenv("RLGRID_TEST_SECRET", SECRET)
    msg = error_of(text)
    assert key in msg and "interpolation" in msg
    import os
    assert os.environ["HOME"] not in msg.replace("line", "") and SECRET not in msg


@pytest.mark.parametrize("override", ["runtime_args.exp_name=${oc.env:HOME}",
                                      "runtime_args.data_path=${oc.env:RLGRID_TEST_SECRET}",
                                      "runtime_args.exp_name=\\${oc.env:HOME}"])
def test_interpolation_in_overrides_is_refused(override, monkeypatch):
    monkeypatch.setenv("RLGRID_TEST_SECRET", SECRET)
    msg = error_of(overrides=("runtime_args.seed=3", override))
    assert "overrides[1]" in msg and "interpolation" in msg and SECRET not in msg


def test_anchors_and_aliases_are_refused():
    msg = error_of("base: &b {seed: 1}\nruntime_args: *b\n")
    assert "aliases" in msg and "line 1" in msg   # where the anchored value starts


def test_no_error_repeats_the_text():
    """A file sent by mistake (or on purpose) never comes back in the message: keys that are not key
    names, values of the wrong type, a YAML syntax error's line are all left out."""
    passwd = f"root:x:0:0:{SECRET}:/root:/bin/bash\ndaemon:x:1:1:{SECRET}:/usr/sbin:/usr/sbin/nologin\n"
    cases = {
        passwd: "(a key that is not a config key name)",
        f"{SECRET} {SECRET}: x\n": "(a key that is not a config key name)",
        f"runtime_args:\n  seed: {SECRET}\n": "invalid value for 'runtime_args.seed' (line 2, column 3 of config text)",
        f"runtime_args:\n  seed: [{SECRET}\n": "invalid YAML in config text at line 3, column 1",
        f"runtime_args: \"{SECRET}\n": "invalid YAML in config text at line 2",
        f"runtime_args:\n  seed: '\\{SECRET}'\n": "invalid value for 'runtime_args.seed'",
        f"!!python/object:os.system {{{SECRET}: 1}}\n": "invalid YAML in config text at line 1, column 1",
        f"models:\n  policy:\n    engine: {SECRET}\n": "models.policy.engine is invalid; must be one of",
    }
    for text, expected in cases.items():
        msg = error_of(text)
        assert expected in msg and SECRET not in msg, (text, msg)
    for override in (f"runtime_args.seed={SECRET}", f"runtime_args.seed=[{SECRET}", f"runtime_args.{SECRET} x=1"):
        msg = error_of(overrides=(override,))
        assert SECRET not in msg and "overrides[0]" in msg, msg


def test_errors_locate_the_key_in_the_yaml():
    msg = error_of("runtime_args:\n  seed: 1\n  num_episod: 3\n")
    assert "unknown config key 'runtime_args.num_episod'" in msg and "line 3, column 3 of config text" in msg
    with pytest.raises(ConfigError, match="line 2, column 3 of config_path"):
        load_config("runtime_args:\n  seed: x\n", source="config_path")


def test_config_text_is_bounded_before_parsing() -> None:
    from services.common.config import MAX_CONFIG_CHARS
    assert "at most" in error_of("runtime_args:\n  seed: 1\n" + "#" * MAX_CONFIG_CHARS)
    assert "at most" in error_of(overrides=tuple(f"runtime_args.seed={i:0999d}" for i in range(1100)))


def test_deep_nesting_is_refused_before_anything_recurses() -> None:
    for text in ("a: " + "[" * 5000, "a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 40)) + " " * 40 + "v: 1\n"):
        assert "nests deeper than" in error_of(text)
    assert load_config("runtime_args:\n  seed: 3\n").runtime_args.seed == 3


def test_async_overlap_and_colocated_placement_exclude_each_other() -> None:
    msg = error_of(overrides=("runtime_args.placement=colocated", "runtime_args.off_policy_steps=1"))
    assert "runtime_args.off_policy_steps=1" in msg and "runtime_args.placement=colocated" in msg
    cfg = load_config(overrides=["runtime_args.off_policy_steps=1", "models.policy_trainer.tis_cap=2",
                                 "models.policy_trainer.tis_mode=mask"])
    assert (cfg.runtime_args.placement, cfg.runtime_args.off_policy_steps) == ("auto", 1)
    assert (cfg.models.policy_trainer.tis_cap, cfg.models.policy_trainer.tis_mode) == (2.0, "mask")
    load_config(overrides=["runtime_args.placement=colocated"])
