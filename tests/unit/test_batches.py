"""Tests for services.common.batches: building, splitting, encoding and validating micro-batches."""
from __future__ import annotations

import math
import random

import pytest
import torch

from rlgrid.v1 import common_pb2 as pb
from services.common.batches import (
    MAX_TOKENS_PER_BATCH,
    TrainSequence,
    from_proto,
    make_micro_batch,
    split_into_micro_batches,
    to_proto,
)
from services.common.tensors import to_wire

VOCAB = 23


def _seqs(n: int = 9, seed: int = 0, max_prompt: int = 7, max_response: int = 6) -> list[TrainSequence]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))]
        r = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_response))]
        # logprobs / advantages exactly representable in float32
        lps = [-rng.randint(1, 64) / 16 for _ in r]
        out.append(TrainSequence(p, r, lps, advantage=rng.randint(-8, 8) / 4, version=100 + i))
    return out


def _expected_rows(seqs):
    ids, mask, old, adv = [], [], [], []
    for s in seqs:
        ids += s.prompt_ids + s.response_ids
        mask += [0] * len(s.prompt_ids) + [1] * len(s.response_ids)
        old += [0.0] * len(s.prompt_ids) + s.response_logprobs
        adv += [0.0] * len(s.prompt_ids) + [s.advantage] * len(s.response_ids)
    return ids, mask, old, adv


def test_make_micro_batch_lays_sequences_end_to_end():
    seqs = _seqs()
    mb = make_micro_batch(seqs, num_global_tokens=1000, temperature=0.5, step=4)
    ids, mask, old, adv = _expected_rows(seqs)
    assert mb.input_ids.dtype == torch.int64 and mb.input_ids.tolist() == ids
    assert mb.loss_mask.dtype == torch.bool and mb.loss_mask.int().tolist() == mask
    assert mb.old_logprobs.dtype == torch.float32 and mb.old_logprobs.tolist() == old
    assert mb.advantages.dtype == torch.float32 and mb.advantages.tolist() == adv
    assert mb.versions.tolist() == [s.version for s in seqs]
    assert mb.seq_lens == [len(s.prompt_ids) + len(s.response_ids) for s in seqs]
    assert mb.num_tokens == len(ids)
    assert (mb.num_global_tokens, mb.temperature, mb.step, mb.padded) == (1000, 0.5, 4, False)


@pytest.mark.parametrize("padded", [False, True])
def test_proto_round_trip(padded):
    seqs = _seqs()
    mb = make_micro_batch(seqs, num_global_tokens=500, temperature=0.75, padded=padded, step=11)
    wire = pb.PackedBatch.FromString(to_proto(mb).SerializeToString())
    back = from_proto(wire, vocab_size=VOCAB)
    assert torch.equal(back.input_ids, mb.input_ids) and back.input_ids.dtype == torch.int64
    assert back.seq_lens == mb.seq_lens
    assert torch.equal(back.loss_mask, mb.loss_mask) and back.loss_mask.dtype == torch.bool
    assert torch.equal(back.old_logprobs, mb.old_logprobs)
    assert torch.equal(back.advantages, mb.advantages)
    assert torch.equal(back.versions, mb.versions)
    assert back.num_global_tokens == 500
    assert back.temperature == 0.75 and back.padded == padded and back.step == 11


def test_proximal_logprobs_round_trip_only_when_given():
    mb = make_micro_batch(_seqs(), num_global_tokens=500, temperature=1.0)
    assert not to_proto(mb).HasField("proximal_logprobs")
    assert from_proto(to_proto(mb), vocab_size=VOCAB).proximal_logprobs is None
    mb.proximal_logprobs = mb.old_logprobs * 0.5
    back = from_proto(pb.PackedBatch.FromString(to_proto(mb).SerializeToString()), vocab_size=VOCAB)
    assert torch.equal(back.proximal_logprobs, mb.proximal_logprobs)


def test_wire_layout_matches_proto_contract():
    seqs = _seqs(4)
    msg = to_proto(make_micro_batch(seqs, num_global_tokens=100, temperature=1.0))
    lens = [s.length for s in seqs]
    assert msg.input_ids.dtype == pb.INT32 and list(msg.input_ids.shape) == [sum(lens)]
    assert msg.cu_seqlens.dtype == pb.INT32
    assert list(msg.cu_seqlens.shape) == [len(seqs) + 1]
    assert msg.loss_mask.dtype == pb.UINT8 and msg.old_logprobs.dtype == pb.FLOAT32
    assert msg.advantages.dtype == pb.FLOAT32 and msg.versions.dtype == pb.INT64


def test_from_proto_for_logprobs_only_needs_ids_and_boundaries():
    seqs = _seqs(5)
    full = to_proto(make_micro_batch(seqs, num_global_tokens=1, temperature=0.5))
    msg = pb.PackedBatch(input_ids=full.input_ids, cu_seqlens=full.cu_seqlens, temperature=0.5)
    back = from_proto(msg, vocab_size=VOCAB, for_training=False)
    assert back.input_ids.tolist() == _expected_rows(seqs)[0]
    assert back.seq_lens == [s.length for s in seqs]
    assert back.temperature == 0.5
    with pytest.raises(ValueError, match="loss_mask"):
        from_proto(msg, vocab_size=VOCAB)  # training needs the loss fields
    msg.temperature = 0.0   # unset: the logprobs' temperature is unknown
    with pytest.raises(ValueError, match="temperature"):
        from_proto(msg, vocab_size=VOCAB, for_training=False)


def _ids_of(mb) -> list[int]:
    return mb.versions.tolist()


def test_packing_respects_capacity_and_places_each_sample_once():
    seqs = _seqs(30, seed=3, max_prompt=12, max_response=10)
    capacity = 25
    mbs = split_into_micro_batches(seqs, packing=True, max_token_in_packing=capacity, micro_batch_size=4,
                                   temperature=0.9, step=2)
    by_version = {s.version: s for s in seqs}
    placed = [v for mb in mbs for v in _ids_of(mb)]
    assert sorted(placed) == sorted(by_version)  # every sample exactly once
    total_response = sum(len(s.response_ids) for s in seqs)
    for mb in mbs:
        assert mb.num_tokens <= capacity
        assert not mb.padded and mb.temperature == 0.9 and mb.step == 2
        assert mb.num_global_tokens == total_response
        members = [by_version[v] for v in _ids_of(mb)]
        assert mb.input_ids.tolist() == _expected_rows(members)[0]
        assert mb.seq_lens == [s.length for s in members]
    assert sum(int(mb.loss_mask.sum()) for mb in mbs) == total_response
    # packing actually packs: fewer rows than samples
    assert len(mbs) < len(seqs)


def test_packing_off_makes_fixed_size_padded_batches_in_order():
    seqs = _seqs(10, seed=5)
    mbs = split_into_micro_batches(seqs, packing=False, max_token_in_packing=1, micro_batch_size=4, temperature=1.0)
    assert [_ids_of(mb) for mb in mbs] == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109]]
    total_response = sum(len(s.response_ids) for s in seqs)
    assert all(mb.padded and mb.num_global_tokens == total_response for mb in mbs)


def test_packing_rejects_sample_longer_than_the_bin():
    seqs = _seqs(3)
    longest = max(s.length for s in seqs)
    with pytest.raises(ValueError, match="max_token_in_packing"):
        split_into_micro_batches(seqs, packing=True, max_token_in_packing=longest - 1, micro_batch_size=1,
                                 temperature=1.0)


# ---- from_proto rejects malformed batches -----------------------------------------------------------

SEQS = _seqs(4, seed=7)
T = sum(s.length for s in SEQS)
LOSS_TOKENS = sum(len(s.response_ids) for s in SEQS)


def _valid() -> pb.PackedBatch:
    return to_proto(make_micro_batch(SEQS, num_global_tokens=LOSS_TOKENS, temperature=1.0))


def _cu() -> list[int]:
    out = [0]
    for s in SEQS:
        out.append(out[-1] + s.length)
    return out


def _set(field, tensor):
    def mutate(msg):
        getattr(msg, field).CopyFrom(to_wire(tensor))
    return mutate


def _set_shape(field, shape):
    def mutate(msg):
        getattr(msg, field).shape[:] = shape
    return mutate


def _edit(field, dtype, fn):
    """Decode field, apply fn to a copy, re-encode with the same dtype."""
    def mutate(msg):
        from services.common.tensors import from_wire
        t = from_wire(getattr(msg, field), field).clone()
        getattr(msg, field).CopyFrom(to_wire(fn(t).to(dtype)))
    return mutate


def _first_token_masked(t):
    t[_cu()[2]] = 1  # the first token of the third sequence
    return t


def _nan_at_response(value):
    def fn(t):
        t[_cu()[1] - 1] = value  # last token of the first sequence (a response token)
        return t
    return fn


def _set_attr(name, value):
    def mutate(msg):
        setattr(msg, name, value)
    return mutate


def _set_token(value):
    def fn(t):
        t[3] = value
        return t
    return fn


def _proximal(fn):
    """proximal_logprobs made from the valid batch's own (rollout) logprobs, then fn applied."""
    def mutate(msg):
        from services.common.tensors import from_wire
        msg.proximal_logprobs.CopyFrom(to_wire(fn(from_wire(msg.old_logprobs, "old_logprobs").clone())))
    return mutate


MALFORMED = {
    "loss_mask-short": (_set("loss_mask", torch.zeros(T - 1, dtype=torch.uint8)), "loss_mask"),
    "old_logprobs-long": (_set("old_logprobs", torch.zeros(T + 1)), "old_logprobs"),
    "advantages-short": (_set("advantages", torch.zeros(T - 2)), "advantages"),
    "input_ids-float32": (_set("input_ids", torch.arange(T, dtype=torch.float32)), "input_ids"),
    "input_ids-int64": (_set("input_ids", torch.arange(T, dtype=torch.int64)), "input_ids"),
    "loss_mask-float32": (_set("loss_mask", torch.zeros(T)), "loss_mask"),
    "advantages-float64": (_set("advantages", torch.zeros(T, dtype=torch.float64)), "advantages"),
    "versions-int32": (_set("versions", torch.zeros(len(SEQS), dtype=torch.int32)), "versions"),
    "advantages-unset": (lambda m: m.ClearField("advantages"), "advantages"),
    "input_ids-2d": (_set("input_ids", torch.zeros(1, T, dtype=torch.int32)), "input_ids"),
    "cu_seqlens-not-from-0": (_set("cu_seqlens", torch.tensor([1] + _cu()[1:], dtype=torch.int32)), "cu_seqlens"),
    "cu_seqlens-not-to-T": (_set("cu_seqlens", torch.tensor(_cu()[:-1] + [T - 1], dtype=torch.int32)),
                            "cu_seqlens"),
    "cu_seqlens-past-T": (_set("cu_seqlens", torch.tensor(_cu()[:-1] + [T + 1], dtype=torch.int32)), "cu_seqlens"),
    "cu_seqlens-repeats": (_set("cu_seqlens", torch.tensor(_cu()[:2] + _cu()[1:], dtype=torch.int32)),
                           "cu_seqlens"),
    "cu_seqlens-decreasing": (_set("cu_seqlens", torch.tensor([0, _cu()[2], _cu()[1]] + _cu()[3:], dtype=torch.int32)),
                              "cu_seqlens"),
    "cu_seqlens-single": (_set("cu_seqlens", torch.tensor([0], dtype=torch.int32)), "cu_seqlens"),
    "input_ids-negative-shape": (_set_shape("input_ids", [-T]), "input_ids"),
    "advantages-negative-shape": (_set_shape("advantages", [-T]), "advantages"),
    "cu_seqlens-negative-shape": (_set_shape("cu_seqlens", [-len(SEQS) - 1]), "cu_seqlens"),
    "input_ids-huge-shape": (_set_shape("input_ids", [1 << 50]), "input_ids"),
    "old_logprobs-huge-shape": (_set_shape("old_logprobs", [1 << 62]), "old_logprobs"),
    "input_ids-over-max-tokens": (_set("input_ids", torch.zeros(MAX_TOKENS_PER_BATCH + 1, dtype=torch.int32)),
                                  "input_ids"),
    "input_ids-empty": (_set("input_ids", torch.zeros(0, dtype=torch.int32)), "input_ids"),
    "versions-count": (_set("versions", torch.zeros(len(SEQS) + 1, dtype=torch.int64)), "versions"),
    "loss_mask-on-first-token": (_edit("loss_mask", torch.uint8, _first_token_masked), "loss_mask"),
    "loss_mask-on-token-0": (_edit("loss_mask", torch.uint8, lambda t: t.index_fill_(0, torch.tensor([0]), 1)),
                             "loss_mask"),
    "advantages-nan": (_edit("advantages", torch.float32, _nan_at_response(float("nan"))), "advantages"),
    "advantages-inf": (_edit("advantages", torch.float32, _nan_at_response(float("inf"))), "advantages"),
    "old_logprobs-nan": (_edit("old_logprobs", torch.float32, _nan_at_response(float("nan"))), "old_logprobs"),
    "old_logprobs-neginf-off-mask": (_edit("old_logprobs", torch.float32, lambda t: t.index_fill_(
        0, torch.tensor([0]), float("-inf"))), "old_logprobs"),
    "num_global_tokens-too-small": (_set_attr("num_global_tokens", LOSS_TOKENS - 1), "num_global_tokens"),
    "num_global_tokens-zero": (_set_attr("num_global_tokens", 0), "num_global_tokens"),
    "num_global_tokens-negative": (_set_attr("num_global_tokens", -5), "num_global_tokens"),
    "input_ids-eq-vocab": (_edit("input_ids", torch.int32, _set_token(VOCAB)), "input_ids"),
    "input_ids-huge-id": (_edit("input_ids", torch.int32, _set_token(2**31 - 1)), "input_ids"),
    "input_ids-negative-id": (_edit("input_ids", torch.int32, _set_token(-1)), "input_ids"),
    "temperature-negative": (_set_attr("temperature", -0.5), "temperature"),
    # out-of-range loss values: finite, but the loss would overflow or they cannot be log-probabilities
    "temperature-zero": (_set_attr("temperature", 0.0), "temperature"),
    "temperature-tiny": (_set_attr("temperature", 1e-30), "temperature"),
    "temperature-huge": (_set_attr("temperature", 3e38), "temperature"),
    "advantages-3e38": (_edit("advantages", torch.float32, _nan_at_response(3e38)), "advantages"),
    "advantages-off-mask": (_edit("advantages", torch.float32, lambda t: t.index_fill_(0, torch.tensor([0]), 1.0)),
                            "advantages"),
    "old_logprobs-positive": (_edit("old_logprobs", torch.float32, _nan_at_response(5.0)), "old_logprobs"),
    "old_logprobs-below-floor": (_edit("old_logprobs", torch.float32, _nan_at_response(-1e30)), "old_logprobs"),
    "old_logprobs-off-mask": (_edit("old_logprobs", torch.float32, lambda t: t.index_fill_(0, torch.tensor([0]), -3e38)),
                              "old_logprobs"),
    "versions-negative": (_set("versions", torch.full((len(SEQS),), -1, dtype=torch.int64)), "versions"),
    "loss_mask-two": (_edit("loss_mask", torch.uint8, lambda t: t * 2), "loss_mask"),
    "proximal_logprobs-short": (_proximal(lambda t: t[1:]), "proximal_logprobs"),
    "proximal_logprobs-float64": (_proximal(lambda t: t.double()), "proximal_logprobs"),
    "proximal_logprobs-nan": (_proximal(_nan_at_response(float("nan"))), "proximal_logprobs"),
    "proximal_logprobs-positive": (_proximal(_nan_at_response(5.0)), "proximal_logprobs"),
    "proximal_logprobs-below-floor": (_proximal(_nan_at_response(-1e30)), "proximal_logprobs"),
    "proximal_logprobs-off-mask": (_proximal(lambda t: t.index_fill_(0, torch.tensor([0]), -1.0)), "proximal_logprobs"),
}


def test_valid_batch_passes():
    mb = from_proto(_valid(), vocab_size=VOCAB)
    assert mb.num_tokens == T and int(mb.loss_mask.sum()) == LOSS_TOKENS


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_from_proto_rejects_malformed(case):
    mutate, field = MALFORMED[case]
    msg = _valid()
    mutate(msg)
    with pytest.raises(ValueError, match=field):
        from_proto(msg, vocab_size=VOCAB)


def test_vocab_check_is_skipped_without_vocab_size():
    msg = _valid()
    _edit("input_ids", torch.int32, _set_token(VOCAB + 5))(msg)
    assert from_proto(msg).input_ids[3] == VOCAB + 5
    with pytest.raises(ValueError, match="input_ids"):
        from_proto(msg, vocab_size=VOCAB)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_from_proto_rejects_non_finite_temperature(value):
    msg = _valid()
    msg.temperature = value
    with pytest.raises(ValueError, match="temperature"):
        from_proto(msg, vocab_size=VOCAB)


def _limits_cfg(*overrides: str):
    from services.common.config import load_config
    return load_config(overrides=["runtime_args.sample_per_episode=64", "runtime_args.train_global_batch_size=32",
                                  "models.policy.max_prompt_tokens_length=7", "models.policy.max_response_tokens_length=6",
                                  "models.policy_trainer.max_token_in_packing=40", *overrides])


def test_batch_limits_follow_the_run():
    """What the trainer accepts is bounded by the run it is set up for, naming the keys."""
    from services.common.batches import BatchLimits
    cfg = _limits_cfg()
    limits = BatchLimits.of(cfg, step=5)
    assert limits.versions == (4, 5)   # 64 / 32 = 2 optimizer steps per episode: one step behind at most
    assert (limits.max_sequence, limits.max_tokens, limits.max_loss_tokens) == (13, 40, 32 * 6)
    seqs = [TrainSequence([1, 2], [3, 4], [-1.0, -1.0], 1.0, 5), TrainSequence([1], [3], [-1.0], 1.0, 4)]
    limits.check(make_micro_batch(seqs, num_global_tokens=3, temperature=1.0))

    def refused(mb, *needles, for_training=True):
        with pytest.raises(ValueError) as info:
            limits.check(mb, for_training=for_training)
        for needle in needles:
            assert needle in str(info.value)
    stale = [TrainSequence([1], [3], [-1.0], 1.0, 3)]
    refused(make_micro_batch(stale, num_global_tokens=1, temperature=1.0), "versions", "[4, 5]")
    future = [TrainSequence([1], [3], [-1.0], 1.0, 6)]
    refused(make_micro_batch(future, num_global_tokens=1, temperature=1.0), "versions")
    refused(make_micro_batch(seqs, num_global_tokens=3, temperature=0.7), "models.policy.temperature")
    long = [TrainSequence([1] * 7, [3] * 7, [-1.0] * 7, 1.0, 5)]
    refused(make_micro_batch(long, num_global_tokens=7, temperature=1.0), "max_response_tokens_length")
    many = [TrainSequence([1] * 7, [3] * 6, [-1.0] * 6, 1.0, 5)] * 4   # 52 tokens > 40
    refused(make_micro_batch(many, num_global_tokens=24, temperature=1.0), "max_token_in_packing")
    refused(make_micro_batch(seqs, num_global_tokens=10**9, temperature=1.0), "num_global_tokens")
    # logprobs only: versions and bins do not matter, the step's size does
    limits.check(make_micro_batch(many, num_global_tokens=24, temperature=1.0), for_training=False)
    refused(make_micro_batch(many * 9, num_global_tokens=1, temperature=1.0), "train_global_batch_size",
            for_training=False)


def test_version_window_widens_with_off_policy_steps_and_no_further():
    """off_policy_steps = d: an episode's samples may come from up to d episodes before it, so the
    trainer accepts versions (d + 1) x (optimizer steps per episode) - 1 behind its step, no older."""
    from services.common.batches import BatchLimits
    assert BatchLimits.of(_limits_cfg(), step=9).versions == (8, 9)
    assert BatchLimits.of(_limits_cfg("runtime_args.off_policy_steps=1"), step=9).versions == (6, 9)
    assert BatchLimits.of(_limits_cfg("runtime_args.off_policy_steps=2"), step=9).versions == (4, 9)
    limits = BatchLimits.of(_limits_cfg("runtime_args.off_policy_steps=1"), step=9)
    limits.check(make_micro_batch([TrainSequence([1], [3], [-1.0], 1.0, 6)], num_global_tokens=1, temperature=1.0))
    with pytest.raises(ValueError, match=r"outside \[6, 9\].*runtime_args.off_policy_steps=1"):
        limits.check(make_micro_batch([TrainSequence([1], [3], [-1.0], 1.0, 5)], num_global_tokens=1,
                                      temperature=1.0))


def test_proximal_logprobs_are_refused_without_tis():
    from services.common.batches import BatchLimits
    mb = make_micro_batch([TrainSequence([1], [3], [-1.0], 1.0, 9)], num_global_tokens=1, temperature=1.0)
    mb.proximal_logprobs = mb.old_logprobs.clone()
    with pytest.raises(ValueError, match="models.policy_trainer.tis_cap is not set"):
        BatchLimits.of(_limits_cfg(), step=9).check(mb)
    BatchLimits.of(_limits_cfg("models.policy_trainer.tis_cap=2"), step=9).check(mb)
