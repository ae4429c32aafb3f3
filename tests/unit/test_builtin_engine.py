"""Tests for services.rollout.engines.builtin.BuiltinEngine on CPU float32 with a tiny Qwen3."""
from __future__ import annotations

import collections

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.rollout.engine import Sampling
from services.rollout.engines.builtin import BuiltinEngine
from tests.conftest import TINY_VOCAB_SIZE

EOS = 1
CPU = torch.device("cpu")
# Different lengths in one batch: the engine left-pads the shorter ones.
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15], [16]]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> BuiltinEngine:
    return BuiltinEngine(tiny_model_dir, dtype=torch.float32, device=CPU, max_num_seqs=64)


@pytest.fixture
def fresh_engine(tiny_model_dir) -> BuiltinEngine:
    """For tests that change weights."""
    return BuiltinEngine(tiny_model_dir, dtype=torch.float32, device=CPU, max_num_seqs=8)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


GREEDY_TOKENS = 8


@pytest.fixture(scope="module")
def greedy_refs(hf_model):
    return {i: _greedy(hf_model, p, GREEDY_TOKENS) for i, p in enumerate(PROMPTS)}


def _generate(engine, prompts=PROMPTS, n=1, **sampling):
    return list(engine.generate(prompts, Sampling(**sampling), n))


def _reference_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[positions, torch.tensor(response)]


def _greedy(model, prompt, max_tokens, stop=(EOS,)):
    """Independent argmax decoding: a full forward per step, no cache, no padding."""
    ids = list(prompt)
    out = []
    for _ in range(max_tokens):
        with torch.no_grad():
            tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok in stop:
            break
    return out


def test_info(engine, tiny_model_dir):
    info = engine.info()
    assert info.engine == "builtin" and info.model == tiny_model_dir
    assert info.vocab_size == TINY_VOCAB_SIZE and info.eos_token_id == EOS
    names = [p.name for p in info.params]
    assert names == [n for n, _ in engine.model.named_parameters()]
    assert all(p.dtype == torch.float32 for p in info.params)


def test_n_samples_per_prompt_and_prompt_index(engine, monkeypatch):
    n = 3
    # fewer sequences per batch than prompts * n: generation runs in several batches
    monkeypatch.setattr(engine, "max_num_seqs", 5)
    gens = _generate(engine, n=n, temperature=1.0, max_tokens=4, seed=11)
    assert len(gens) == n * len(PROMPTS)
    assert collections.Counter(g.prompt_index for g in gens) == {i: n for i in range(len(PROMPTS))}
    for g in gens:
        assert 1 <= len(g.response_ids) <= 4
        assert len(g.logprobs) == len(g.response_ids)
        assert all(0 <= t < TINY_VOCAB_SIZE for t in g.response_ids)
        assert g.policy_version == engine.version == 0


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_match_an_independent_full_forward(engine, hf_model, temperature):
    """Validates the KV-cache decode path, with left-padded prompts of different lengths in one batch."""
    gens = _generate(engine, n=3, temperature=temperature, max_tokens=10, seed=5)
    for g in gens:
        lp = torch.tensor(g.logprobs)
        assert torch.isfinite(lp).all() and (lp <= 0).all()
        ref = _reference_logprobs(hf_model, PROMPTS[g.prompt_index], g.response_ids, temperature)
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)


def test_logprobs_are_unfiltered_by_top_k(engine, hf_model):
    gens = _generate(engine, n=2, temperature=1.0, top_k=3, max_tokens=6, seed=9)
    for g in gens:
        ref = _reference_logprobs(hf_model, PROMPTS[g.prompt_index], g.response_ids, 1.0)
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-4, rtol=0)
        # every sampled token is among the 3 most likely at its step
        ids = torch.tensor([PROMPTS[g.prompt_index] + g.response_ids])
        with torch.no_grad():
            logits = hf_model(input_ids=ids).logits[0]
        p = len(PROMPTS[g.prompt_index])
        for k, tok in enumerate(g.response_ids):
            assert tok in logits[p - 1 + k].topk(3).indices.tolist()


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)],
                         ids=["top_k=1", "top_p=1e-6", "temperature=0"])
def test_greedy(engine, hf_model, greedy_refs, sampling):
    max_tokens = GREEDY_TOKENS
    sampling = {"temperature": 1.0, **sampling}
    gens = _generate(engine, n=2, max_tokens=max_tokens, seed=123, **sampling)
    for g in gens:
        assert g.response_ids == greedy_refs[g.prompt_index]
        assert g.finish_reason == ("stop" if g.response_ids[-1] == EOS else "length")
        if sampling["temperature"] == 0:   # greedy reports logprobs of softmax(logits), finite
            ref = _reference_logprobs(hf_model, PROMPTS[g.prompt_index], g.response_ids, 1.0)
            torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-4, rtol=0)
    # greedy does not depend on the seed
    again = _generate(engine, n=2, max_tokens=max_tokens, seed=999, **sampling)
    assert [g.response_ids for g in again] == [g.response_ids for g in gens]


def test_stop_at_eos_and_length(engine):
    max_tokens = 30
    # a high temperature makes the 23-token distribution near uniform, so EOS comes up often
    gens = _generate(engine, n=8, temperature=4.0, max_tokens=max_tokens, seed=3)
    reasons = collections.Counter(g.finish_reason for g in gens)
    assert reasons["stop"] > 0 and reasons["length"] > 0
    for g in gens:
        if g.finish_reason == "stop":
            assert g.response_ids[-1] == EOS
            assert EOS not in g.response_ids[:-1]
        else:
            assert g.finish_reason == "length"
            assert len(g.response_ids) == max_tokens
            assert EOS not in g.response_ids


def test_max_tokens_reached_gives_length(engine, greedy_refs):
    # greedy continuation of a prompt with no EOS in its first 3 tokens
    prompt = next(PROMPTS[i] for i, ref in greedy_refs.items() if EOS not in ref[:3])
    (g,) = _generate(engine, prompts=[prompt], n=1, top_k=1, max_tokens=3, seed=1)
    assert len(g.response_ids) == 3 and g.finish_reason == "length"


def test_extra_stop_token(engine, greedy_refs):
    i, greedy = next((i, ref) for i, ref in greedy_refs.items() if ref[0] != EOS)
    prompt = PROMPTS[i]
    # the latest token that is not EOS and first occurs there
    stop_at = max(k for k, t in enumerate(greedy) if t != EOS and t not in greedy[:k])
    (g,) = _generate(engine, prompts=[prompt], n=1, top_k=1, max_tokens=8, seed=1,
                     stop_token_ids=(greedy[stop_at],))
    assert g.response_ids == greedy[: stop_at + 1]
    assert g.finish_reason == "stop"


def test_same_seed_same_samples_different_seed_different(engine):
    kw = dict(n=3, temperature=1.0, max_tokens=8)
    a = [(g.prompt_index, g.response_ids, g.logprobs) for g in _generate(engine, seed=42, **kw)]
    b = [(g.prompt_index, g.response_ids, g.logprobs) for g in _generate(engine, seed=42, **kw)]
    c = [(g.prompt_index, g.response_ids, g.logprobs) for g in _generate(engine, seed=43, **kw)]
    assert a == b
    assert [x[1] for x in a] != [x[1] for x in c]


def _by_key(gens, keys):
    """(key, j) -> (tokens, logprobs) of a call's generations; j counts a prompt's samples in order."""
    out, seen = {}, collections.Counter()
    for g in gens:
        key = keys[g.prompt_index]
        out[key, seen[key]] = (g.response_ids, g.logprobs)
        seen[key] += 1
    return out


def test_a_prompts_samples_are_the_same_in_any_batch_call_or_order(engine, fresh_engine):
    """Each prompt samples from (seed, its key): split over calls, reordered, or cut by a batch
    boundary (fresh_engine decodes 8 rows at a time, so 4 x 3 samples make batches of 8 and 4, and
    prompt 2's samples straddle them), a prompt's samples stay the same; with another key they differ."""
    keys = ["3-0", "3-1", "3-2", "3-3"]
    kw = dict(temperature=1.0, max_tokens=8, seed=42)
    whole = _by_key(engine.generate(PROMPTS, Sampling(**kw), 3, keys), keys)
    split = {}
    for part in ([3, 1], [2], [0]):
        part_keys = [keys[i] for i in part]
        split |= _by_key(engine.generate([PROMPTS[i] for i in part], Sampling(**kw), 3, part_keys), part_keys)
    straddled = _by_key(fresh_engine.generate(PROMPTS, Sampling(**kw), 3, keys), keys)
    assert len(whole) == 12 and set(split) == set(straddled) == set(whole)
    for key_j, (tokens, logprobs) in whole.items():
        for other in (split, straddled):
            assert other[key_j][0] == tokens, key_j
            assert torch.allclose(torch.tensor(other[key_j][1]), torch.tensor(logprobs), atol=1e-5), key_j
    renamed = _by_key(engine.generate(PROMPTS, Sampling(**kw), 3, ["x", "y", "z", "w"]), ["x", "y", "z", "w"])
    assert [renamed[k, j][0] for k in "xyzw" for j in range(3)] != [whole[k, j][0] for k in keys for j in range(3)]


@pytest.mark.parametrize("bad,index", [
    ([[3, 4], [5, TINY_VOCAB_SIZE]], 1),
    ([[3, 4], [5, 6], [-1]], 2),
    ([[], [5, 6]], 0),
    ([[3], [5, 10**9]], 1),
], ids=["eq-vocab", "negative", "empty", "huge"])
def test_invalid_prompt_ids_raise(engine, bad, index):
    with pytest.raises(ValueError, match=rf"prompts\[{index}\]"):
        _generate(engine, prompts=bad, max_tokens=2, seed=1)


# ---- weights: stage / commit / abort -----------------------------------------------------------------

SYNC_SAMPLING = dict(n=2, temperature=1.0, max_tokens=8, seed=77)


def _outputs(engine):
    return [(g.prompt_index, g.response_ids, g.logprobs) for g in _generate(engine, **SYNC_SAMPLING)]


def _snapshot(engine):
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def _new_weights(engine, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach().cpu() + scale * torch.randn(p.shape, generator=g) for n, p in engine.model.named_parameters()}


def _same_params(engine, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in engine.model.named_parameters())


def test_stage_then_commit(fresh_engine, hf_model):
    e = fresh_engine
    before = _outputs(e)
    new = _new_weights(e)
    expected = {n: t.clone() for n, t in new.items()}
    e.stage_weights(iter(new.items()), version=5)
    assert _outputs(e) == before and e.version == 0
    assert all(g.policy_version == 0 for g in _generate(e, **SYNC_SAMPLING))
    assert e.commit_weights(5) == 5
    assert e.version == 5
    for n, p in e.model.named_parameters():
        assert torch.equal(p, expected[n]), n
    gens = _generate(e, **SYNC_SAMPLING)
    assert all(g.policy_version == 5 for g in gens)
    assert [(g.prompt_index, g.response_ids, g.logprobs) for g in gens] != before
    # and the new outputs are what the new weights predict
    hf_model_new = type(hf_model)(hf_model.config).eval()
    hf_model_new.load_state_dict(expected, strict=False)
    hf_model_new.tie_weights()
    for g in gens:
        ref = _reference_logprobs(hf_model_new, PROMPTS[g.prompt_index], g.response_ids, 1.0)
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-4, rtol=0)
    # a commit consumes the staged weights
    with pytest.raises(ValueError):
        e.commit_weights(5)


def test_abort_drops_staged(fresh_engine):
    e = fresh_engine
    before, snap = _outputs(e), _snapshot(e)
    e.stage_weights(iter(_new_weights(e).items()), version=3)
    e.abort_weights()
    with pytest.raises(ValueError, match="3"):
        e.commit_weights(3)
    assert e.version == 0 and _same_params(e, snap) and _outputs(e) == before


def _drop_one(new):
    items = list(new.items())
    return items[:1] + items[2:]


def _reshape_one(new):
    items = list(new.items())
    name, t = items[1]
    return [items[0], (name, t.reshape(-1)[: t.numel() - 1])] + items[2:]


def _unknown_name(new):
    return list(new.items()) + [("model.not_a_layer.weight", torch.zeros(3))]


@pytest.mark.parametrize("corrupt,match", [
    (_drop_one, "lacks"), (_reshape_one, "shape"), (_unknown_name, "not_a_layer"),
], ids=["missing", "wrong-shape", "unknown"])
def test_bad_stage_raises_and_leaves_serving_weights(fresh_engine, corrupt, match):
    e = fresh_engine
    before, snap = _outputs(e), _snapshot(e)
    with pytest.raises(ValueError, match=match):
        e.stage_weights(iter(corrupt(_new_weights(e))), version=4)
    assert _same_params(e, snap) and e.version == 0
    with pytest.raises(ValueError):
        e.commit_weights(4)  # nothing of version 4 was staged
    assert _same_params(e, snap) and _outputs(e) == before


def test_commit_of_unstaged_version_raises(fresh_engine):
    e = fresh_engine
    snap = _snapshot(e)
    with pytest.raises(ValueError, match="7"):
        e.commit_weights(7)
    e.stage_weights(iter(_new_weights(e).items()), version=8)
    with pytest.raises(ValueError, match="7"):
        e.commit_weights(7)  # a different version is staged
    assert e.version == 0 and _same_params(e, snap)
    assert e.commit_weights(8) == 8 and not _same_params(e, snap)


def test_commit_copies_in_place(fresh_engine):
    """Captured CUDA graphs read the parameters' storage: a commit must write into it, not rebind it."""
    e = fresh_engine
    _outputs(e)   # decode once, so there is state that could hold on to the old weights
    before = {n: p.data_ptr() for n, p in e.model.named_parameters()}
    e.stage_weights(iter(_new_weights(e).items()), version=2)
    e.commit_weights(2)
    assert {n: p.data_ptr() for n, p in e.model.named_parameters()} == before


# ---- the decode loop: fixed-size KV cache, dropping finished rows, fixed shapes -----------------------

def _assert_match_full_forward(gens, model, temperature, prompts=PROMPTS):
    for g in gens:
        ref = _reference_logprobs(model, prompts[g.prompt_index], g.response_ids, temperature)
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-4, rtol=0)
        assert g.finish_reason == ("stop" if g.response_ids[-1] == EOS else "length")
        assert EOS not in g.response_ids[:-1]


def _count_row_drops(monkeypatch) -> list[int]:
    from services.rollout.engines.static_kv import StaticKVCache
    kept, keep_rows = [], StaticKVCache.keep_rows
    monkeypatch.setattr(StaticKVCache, "keep_rows", lambda self, index: (kept.append(len(index)),
                                                                        keep_rows(self, index))[1])
    return kept


def test_dropping_finished_rows_keeps_logprobs_exact(engine, hf_model, monkeypatch):
    kept = _count_row_drops(monkeypatch)
    # near-uniform sampling: rows stop at different steps, so the batch shrinks several times
    gens = _generate(engine, n=8, temperature=4.0, max_tokens=30, seed=3)
    assert kept, "no finished rows were dropped"
    assert collections.Counter(g.prompt_index for g in gens) == {i: 8 for i in range(len(PROMPTS))}
    _assert_match_full_forward(gens, hf_model, 4.0)


@pytest.fixture
def fixed_shapes_engine(tiny_model_dir, monkeypatch) -> BuiltinEngine:
    """The shapes CUDA graphs decode with (rows padded to 1, 2, 4, 8, 16; attention over whole
    blocks of the cache, 8 positions here), run eagerly on CPU: everything but the capture."""
    from services.rollout.engines import builtin
    monkeypatch.setattr(builtin, "KV_STEP", 8)
    e = BuiltinEngine(tiny_model_dir, dtype=torch.float32, device=CPU, max_num_seqs=16)
    e.fixed_shapes = True
    return e


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=4.0), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.0, top_p=0.8)], ids=["t1", "t4", "top_k", "top_p"])
def test_fixed_shapes_match_full_forward(fixed_shapes_engine, hf_model, monkeypatch, sampling):
    e = fixed_shapes_engine
    kept = _count_row_drops(monkeypatch)
    n = 3   # 12 sequences decode as 16 rows; 4 of them padding
    gens = _generate(e, n=n, max_tokens=30, seed=21, **sampling)
    assert collections.Counter(g.prompt_index for g in gens) == {i: n for i in range(len(PROMPTS))}
    _assert_match_full_forward(gens, hf_model, sampling["temperature"])
    assert all(r in (1, 2, 4, 8, 16) for r in kept)
    assert _generate(e, n=n, max_tokens=30, seed=21, **sampling) == gens


def test_fixed_shapes_greedy(fixed_shapes_engine, hf_model, greedy_refs):
    """temperature 0 (the coordinator's greedy evaluation) on the decode step a CUDA graph captures."""
    gens = _generate(fixed_shapes_engine, n=2, temperature=0.0, max_tokens=GREEDY_TOKENS, seed=3)
    assert all(g.response_ids == greedy_refs[g.prompt_index] for g in gens)
    _assert_match_full_forward(gens, hf_model, 1.0)


def test_longer_requests_grow_the_cache(fixed_shapes_engine, hf_model):
    e = fixed_shapes_engine
    _generate(e, prompts=PROMPTS[1:2], max_tokens=2, seed=1)
    small = e._slots.capacity
    gens = _generate(e, n=6, temperature=0.5, max_tokens=25, seed=2)
    assert e._slots.capacity[0] > small[0] and e._slots.capacity[1] > small[1]
    _assert_match_full_forward(gens, hf_model, 0.5)


def test_enforce_eager_keeps_exact_shapes(tiny_model_dir):
    e = BuiltinEngine(tiny_model_dir, dtype=torch.float32, device=CPU, enforce_eager=True)
    assert not e.fixed_shapes and e._rows_for(5) == 5


# ---- sleep and wake up --------------------------------------------------------------------------------

def _param_bytes(engine) -> int:
    return sum(p.untyped_storage().nbytes() for p in engine.model.parameters())


def test_level_1_sleep_drops_the_kv_cache_and_wakes_to_the_same_outputs(fresh_engine):
    from services.common.rpc import FailedPrecondition
    e = fresh_engine
    before = _outputs(e)
    assert e._slots is not None
    e.sleep(1)
    e.sleep(1)   # idempotent
    assert e._slots is None and e.sleep_level == 1 and e.weights_valid
    with pytest.raises(FailedPrecondition, match="asleep .Sleep level 1.: call WakeUp first"):
        _generate(e)
    e.stage_weights(iter(_new_weights(e).items()), version=2)   # receiving while asleep is fine ...
    with pytest.raises(FailedPrecondition, match="WakeUp before CommitWeights"):
        e.commit_weights(2)   # ... committing is not
    e.wake_up()
    e.wake_up()
    assert e.sleep_level == 0 and _outputs(e) == before and e.version == 0


def test_wake_up_by_tag_brings_back_the_weights_before_the_kv_cache(fresh_engine):
    """Colocated placement wakes the weights for a sync while the trainer still holds its memory, and
    the KV cache only before generating."""
    from services.common.rpc import FailedPrecondition, InvalidArgument
    e = fresh_engine
    before = _outputs(e)
    e.sleep(1)
    with pytest.raises(InvalidArgument, match="tags: unknown .'kv'.; use .'weights', 'kv_cache'."):
        e.wake_up(("kv",))
    assert e.asleep == {"weights", "kv_cache"}   # the refused call changed nothing
    e.wake_up(("weights",))
    assert e.sleep_level == 1 and e.asleep == {"kv_cache"}
    with pytest.raises(FailedPrecondition, match=r"call WakeUp first \(still asleep: kv_cache\)"):
        _generate(e)
    e.stage_weights(iter(_new_weights(e).items()), version=3)
    assert e.commit_weights(3) == 3   # the weights are awake: a sync can land in them
    e.wake_up(("kv_cache",))
    assert e.sleep_level == 0 and not e.asleep
    assert _outputs(e) != before and e.version == 3   # new weights, a rebuilt KV cache


def test_level_2_sleep_frees_the_weights_until_a_sync_commits(fresh_engine, hf_model):
    from services.common.rpc import FailedPrecondition
    e = fresh_engine
    snap, before, held = _snapshot(e), _outputs(e), _param_bytes(e)
    e.stage_weights(iter(_new_weights(e).items()), version=4)
    e.sleep(1)
    e.sleep(2)   # deeper
    assert _param_bytes(e) == 0 and held > 0 and e.sleep_level == 2
    with pytest.raises(ValueError, match="no staged weights"):   # sleep dropped what was staged
        e.wake_up() or e.commit_weights(4)
    assert _param_bytes(e) == held and not e.weights_valid
    with pytest.raises(FailedPrecondition, match="level-2 Sleep and no weight sync has committed"):
        _generate(e)
    e.sleep(1)   # shallower than the level-2 sleep it was in before waking: a real level-1 sleep now
    e.wake_up()
    e.stage_weights(iter(snap.items()), version=5)   # the sync after the sleep brings the weights
    assert e.commit_weights(5) == 5 and e.weights_valid
    assert [(i, ids, lps) for i, ids, lps in _outputs(e)] == before

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=4.0), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.0, top_p=0.8)], ids=["t1", "t4", "top_k", "top_p"])
def test_cuda_graphs_match_full_forward(tiny_model_dir, hf_model, sampling):
    e = BuiltinEngine(tiny_model_dir, dtype=torch.float32, device=torch.device("cuda"), max_num_seqs=16)
    assert e.fixed_shapes
    gens = _generate(e, n=3, max_tokens=30, seed=21, **sampling)
    assert e._graphs, "no CUDA graph was captured"
    _assert_match_full_forward(gens, hf_model, sampling["temperature"])
    assert _generate(e, n=3, max_tokens=30, seed=21, **sampling) == gens


@cuda
def test_cuda_graphs_see_committed_weights(tiny_model_dir, hf_model):
    e = BuiltinEngine(tiny_model_dir, dtype=torch.float32, device=torch.device("cuda"), max_num_seqs=8)
    before = _outputs(e)
    graphs = dict(e._graphs)
    assert graphs
    new = _new_weights(e)
    e.stage_weights(iter(new.items()), version=1)
    e.commit_weights(1)
    gens = _generate(e, **SYNC_SAMPLING)
    assert e._graphs == graphs, "the same graphs replay after a commit"
    assert [(g.prompt_index, g.response_ids, g.logprobs) for g in gens] != before
    hf_model_new = type(hf_model)(hf_model.config).eval()
    hf_model_new.load_state_dict(new, strict=False)
    hf_model_new.tie_weights()
    _assert_match_full_forward(gens, hf_model_new, 1.0)


@cuda
def test_cuda_enforce_eager_captures_nothing(tiny_model_dir, hf_model):
    e = BuiltinEngine(tiny_model_dir, dtype=torch.float32, device=torch.device("cuda"), enforce_eager=True)
    gens = _generate(e, n=2, temperature=1.0, max_tokens=12, seed=4)
    assert not e.fixed_shapes and not e._graphs
    _assert_match_full_forward(gens, hf_model, 1.0)
