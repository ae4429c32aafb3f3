"""Tests for services.trainer.ulysses (sequence parallelism) that run in one process: validation,
the deal to SP groups, and the Ulysses attention at SP size 1 against transformers' sdpa path.
Two ranks: tests/integration/test_ulysses_ranks.py."""
from __future__ import annotations

import copy

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlgrid.v1 import common_pb2 as pb
from services.common.config import ConfigError, config_to_yaml, load_config
from services.trainer.backends.fsdp import init_distributed
from services.trainer.loss import token_logprobs_and_entropy
from services.trainer.ranks import TrainerRanks, balance
from services.trainer.server import TrainerServicer
from services.trainer.ulysses import KEY, SequenceParallel, check_sp
from tests.unit.test_fsdp_backend import _mb, _overrides, _seqs

CPU = torch.device("cpu")


@pytest.mark.parametrize("args,needles", [
    ((3, 4, 8, 4), [f"{KEY}=3", "power of two"]),
    ((4, 2, 8, 4), [f"{KEY}=4", "world size 2"]),
    ((4, 6, 8, 4), [f"{KEY}=4", "world size 6"]),
    ((4, 4, 6, 2), [f"{KEY}=4", "num_attention_heads=6"]),
    ((4, 4, 8, 2), [f"{KEY}=4", "num_key_value_heads=2"]),
], ids=["not-power-of-two", "above-world", "not-dividing-world", "q-heads", "kv-heads"])
def test_check_sp_names_the_key_and_the_fix(args, needles, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError) as info:
        check_sp(*args)
    for needle in needles:
        assert needle in str(info.value)


def test_check_sp_keeps_groups_inside_a_node(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=rf"{KEY}=4 must divide the GPUs per node \(2"):
        check_sp(4, 8, 8, 8)
    check_sp(2, 8, 8, 8)


@pytest.mark.parametrize("value", [0, 3, 6])
def test_config_refuses_sp_that_is_not_a_power_of_two(value):
    with pytest.raises(ConfigError, match=rf"{KEY}={value} is invalid; must be a power of two"):
        load_config(overrides=[f"{KEY}={value}"])
    assert load_config(overrides=[f"{KEY}=4"]).models.policy_trainer.ulysses_sequence_parallel_size == 4


def test_balance_gives_an_sp_group_one_list():
    mbs = [_mb(_seqs(n=4, seed=s)) for s in range(3)]
    shards = balance(mbs, 4, sp=2)
    assert shards[0] is shards[1] and shards[2] is shards[3]
    assert [len(s) for s in shards] == [2, 2, 2, 2]   # 3 rows + one filler over two groups
    assert sum(int(mb.loss_mask.sum()) for s in shards[::2] for mb in s) == sum(int(mb.loss_mask.sum()) for mb in mbs)


class _Aborted(Exception):
    pass


class _Context:
    def abort(self, code, message):
        raise _Aborted(code, message)


def test_setup_refuses_sp_the_world_cannot_hold(tiny_model_dir):
    servicer = TrainerServicer(TrainerRanks(CPU))   # a world of one
    cfg = load_config(overrides=_overrides(tiny_model_dir, f"{KEY}=2"))
    with pytest.raises(_Aborted) as info:
        servicer.Setup(pb.SetupRequest(run_id="sp", config_yaml=config_to_yaml(cfg)), _Context())
    code, message = info.value.args
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{KEY}=2 must divide the trainer's world size 1" in message


def test_ulysses_attention_matches_sdpa_at_size_one(tiny_model_dir):
    """The whole SP path (padding, slices, all-to-alls, block-diagonal mask, edge logprob) at one rank."""
    init_distributed(CPU)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ulysses = copy.deepcopy(sdpa)
    SequenceParallel.use_in(ulysses)
    assert ulysses.config._attn_implementation == "rlgrid_ulysses" and sdpa.config._attn_implementation == "sdpa"
    mb = _mb(_seqs(seed=7), temperature=0.7)
    with torch.no_grad():
        lp, ent = SequenceParallel(1).logprobs(ulysses, mb.input_ids, mb.seq_lens, mb.temperature, True)
        want_lp, want_ent = [], []
        for row in torch.split(mb.input_ids, mb.seq_lens):
            got = token_logprobs_and_entropy(sdpa(input_ids=row[None]).logits[0], row, mb.temperature, True)
            want_lp.append(got[0])
            want_ent.append(got[1])
    torch.testing.assert_close(lp, torch.cat(want_lp), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, torch.cat(want_ent), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="rlgrid_ulysses"):
        ulysses(input_ids=mb.input_ids[None])   # outside SequenceParallel.logprobs: no silent full attention
