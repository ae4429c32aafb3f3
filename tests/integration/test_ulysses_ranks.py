"""Ulysses sequence parallelism on two ranks (torchrun, gloo): SP=2 computes what SP=1 computes.

One torchrun launch runs this module on two ranks; each rank sets up an SP=1, an SP=2 and an SP=2
flex_attention trainer (TrainerRanks, so the deal and the metric merge are the service's own) on a
tiny Qwen3 and a tiny Qwen3-MoE (with gradient checkpointing), and on the Qwen3 an SP=2 trainer with
compiled decoder layers (the all-to-alls traced inside them); rank 0 saves the trainers' logprobs,
step metrics and updated weights for the tests. The flex rows are padded to multiples of 8 here (of
1024 on GPUs), so the filler sequence and its slices are exercised too.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from services.common.batches import TrainSequence, make_micro_batch
from services.common.config import config_to_yaml, load_config
from tests.conftest import TINY_VOCAB_SIZE, TINY_WORDS

pytestmark = pytest.mark.slow
ARCHS = ("qwen3", "qwen3_moe")
# name -> (SP size, models.policy_trainer.attn_implementation)
VARIANTS = {"sp1": (1, "sdpa", False), "sp2": (2, "sdpa", False), "sp2_flex": (2, "flex_attention", False),
            "sp2_compiled": (2, "sdpa", True)}
# (arch, variant compared with sp1); compiling runs on the dense model only (the MoE one compiles for minutes on CI)
CASES = [(a, v) for a in ARCHS for v in ("sp2", "sp2_flex")] + [("qwen3", "sp2_compiled")]
# (prompt, response) lengths: rows of 25 and 17 tokens, both odd; the 25-token row's SP slices meet
# inside a sequence, the 17-token row's at a sequence start
ROWS = ([(2, 3), (4, 5), (1, 3), (3, 4)], [(2, 4), (1, 2), (3, 5)])


def _micro_batches(padded: bool = False) -> list:
    g = torch.Generator().manual_seed(0)
    rows = []
    for row in ROWS:
        seqs = [TrainSequence(torch.randint(3, TINY_VOCAB_SIZE, (p,), generator=g).tolist(),
                              torch.randint(3, TINY_VOCAB_SIZE, (r,), generator=g).tolist(),
                              (-1 - torch.rand(r, generator=g)).tolist(), float(torch.randn((), generator=g)), 0)
                for p, r in row]
        rows.append(seqs)
    total = sum(len(s.response_ids) for seqs in rows for s in seqs)
    return [make_micro_batch(seqs, num_global_tokens=total, temperature=0.9, padded=padded) for seqs in rows]


def _worker(root: str, out: str) -> None:
    from services.common.models import resolve_device
    from services.common.tiny_model import build_tiny_model
    from services.trainer import attention
    from services.trainer.ranks import TrainerRanks

    attention.pad_multiple = lambda device: 8   # flex rows end in a filler sequence, as on GPUs

    device = resolve_device()   # this rank's GPU (NCCL) where there are GPUs, else the CPU (gloo)
    rank = int(os.environ["RANK"])
    results = {}
    for arch in ARCHS:
        model_dir = build_tiny_model(os.path.join(root, f"{arch}-rank{rank}"), TINY_WORDS, arch=arch, seed=1)
        trainers = {}
        for name, (sp, attn, compiled) in VARIANTS.items():
            if (arch, name) not in CASES and name != "sp1":
                continue
            cfg = load_config(overrides=[
                f"models.policy.load={model_dir}", "models.policy_trainer.dtype=float32",
                "models.policy_trainer.optimizer.lr=1e-3", "models.policy_trainer.optimizer.weight_decay=0.0",
                "models.policy_trainer.kl_coef=0.1", "models.policy_trainer.entropy_coef=0.01",
                "models.policy.max_prompt_tokens_length=8", "models.policy.max_response_tokens_length=8",
                "models.policy_trainer.max_token_in_packing=64",
                # the MoE model recomputes its layers in backward: the all-to-alls run again there
                f"models.policy_trainer.gradient_checkpointing={arch == 'qwen3_moe'}",
                f"models.policy_trainer.ulysses_sequence_parallel_size={sp}",
                f"models.policy_trainer.attn_implementation={attn}",
                f"models.policy_trainer.torch_compile={compiled}"])
            trainers[name] = TrainerRanks(device)   # init_distributed: torchrun's world of two
            trainers[name]._setup(config_to_yaml(cfg))
        res = {}
        for name, t in trainers.items():
            packed, padded = _micro_batches(), _micro_batches(padded=True)
            res[name] = {"logprobs": [t._logprobs(mb) for mb in packed],
                       "padded": [t._logprobs(mb) for mb in padded],
                       # SP=1 deals one row to each rank; SP=2 gives both rows to its one group
                       "metrics": t._train(packed if rank == 0 else None),
                       "params": {n: p.cpu().clone() for n, p in t.backend.full_params()}}
            res[name]["after"] = [t._logprobs(mb) for mb in packed]
        results[arch] = res
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("ulysses")
    out = d / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", __name__, str(d), str(out)], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_sp2_logprobs_match_sp1(results, arch, variant):
    one, two = results[arch]["sp1"], results[arch][variant]
    for key in ("logprobs", "padded", "after"):
        for a, b, mb in zip(one[key], two[key], _micro_batches()):
            assert a.shape == b.shape == (mb.num_tokens,)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    starts = torch.tensor([0] + [p + r for p, r in ROWS[0]]).cumsum(0)[:-1]
    assert torch.all(two["logprobs"][0][starts] == 0)
    assert (two["after"][0] - two["logprobs"][0]).abs().max() > 1e-3, "the step moved the weights"


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_sp2_train_step_matches_sp1(results, arch, variant):
    one, two = results[arch]["sp1"]["metrics"], results[arch][variant]["metrics"]
    for key in ("loss", "pg_loss", "entropy", "kl", "clip_frac", "grad_norm"):
        assert abs(one[key] - two[key]) < 1e-5 * max(1.0, abs(one[key])), (key, one[key], two[key])
    # counted once per SP group, not once per rank
    assert two["tokens"] == one["tokens"] == sum(p + r for row in ROWS for p, r in row)
    assert two["micro_batches"] == one["micro_batches"] == len(ROWS)
    p1, p2 = results[arch]["sp1"]["params"], results[arch][variant]["params"]
    assert p1.keys() == p2.keys()
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], atol=1e-5, rtol=0, msg=name)


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
