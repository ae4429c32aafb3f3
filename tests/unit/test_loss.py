"""Tests for services.trainer.loss."""

import math

import pytest
import torch

from services.trainer.loss import LossConfig, policy_loss, token_logprobs_and_entropy


def _grad_of_loss(logprobs, old, adv, mask=None, cfg=LossConfig(), n=None, **kw):
    lp = logprobs.clone().requires_grad_(True)
    mask = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask
    loss, metrics = policy_loss(lp, old, adv, mask, cfg=cfg, num_global_tokens=n or lp.numel(), **kw)
    loss.backward()
    return loss, metrics, lp.grad


def test_positive_advantage_pushes_logprobs_up_negative_down():
    old = torch.tensor([-1.0, -2.0])
    adv = torch.tensor([1.0, -1.0])
    _, _, grad = _grad_of_loss(old.clone(), old, adv)
    assert grad[0] < 0 and grad[1] > 0
    # A gradient descent step on the loss increases the A>0 logprob, decreases the A<0 one.
    stepped = old - 0.1 * grad
    assert stepped[0] > old[0] and stepped[1] < old[1]


def test_clip_high_ratio_positive_advantage_has_zero_grad_and_counts():
    old = torch.zeros(4)
    lp = torch.tensor([math.log(1.5), 0.0, 0.0, 0.0])  # ratio 1.5 > 1.2 on token 0
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    _, metrics, grad = _grad_of_loss(lp, old, adv)
    assert grad[0] == 0
    assert (grad[1:] != 0).all()
    assert metrics["clip_frac"].item() == pytest.approx(1 / 4)
    assert metrics["pg_loss"].item() == pytest.approx((-1.2 - 1.0 + 1.0 - 1.0) / 4)


def test_clip_low_ratio_negative_advantage_has_zero_grad():
    old = torch.zeros(2)
    lp = torch.tensor([math.log(0.5), math.log(0.5)])  # ratio 0.5 < 0.8
    adv = torch.tensor([-1.0, 1.0])
    _, metrics, grad = _grad_of_loss(lp, old, adv)
    assert grad[0] == 0
    assert grad[1] != 0  # A>0 with low ratio is not clipped (pessimistic bound)
    assert metrics["clip_frac"].item() == pytest.approx(1 / 2)


def test_asymmetric_clip_ratios():
    cfg = LossConfig(pos_clip_ratio=0.28, neg_clip_ratio=0.2)
    old = torch.zeros(1)
    # ratio 1.25: clipped under symmetric 0.2 but not under pos_clip_ratio=0.28.
    lp = torch.tensor([math.log(1.25)])
    _, m_asym, g_asym = _grad_of_loss(lp, old, torch.ones(1), cfg=cfg)
    _, m_sym, g_sym = _grad_of_loss(lp, old, torch.ones(1), cfg=LossConfig())
    assert g_asym[0] != 0 and m_asym["clip_frac"] == 0
    assert g_sym[0] == 0 and m_sym["clip_frac"] == 1
    # ratio 0.75 with A<0: 0.75 < 1 - 0.2 → clipped even with the wide upper bound.
    lp_low = torch.tensor([math.log(0.75)])
    _, m_low, g_low = _grad_of_loss(lp_low, old, -torch.ones(1), cfg=cfg)
    assert g_low[0] == 0 and m_low["clip_frac"] == 1
    # ... while with neg_clip_ratio=0.3 it is not.
    cfg_wide_neg = LossConfig(pos_clip_ratio=0.2, neg_clip_ratio=0.3)
    _, m_low2, g_low2 = _grad_of_loss(lp_low, old, -torch.ones(1), cfg=cfg_wide_neg)
    assert g_low2[0] != 0 and m_low2["clip_frac"] == 0


def test_kl_zero_at_reference_positive_elsewhere_and_pulls_toward_ref():
    cfg = LossConfig(kl_coef=0.5)
    lp = torch.tensor([-1.0, -1.0, -1.0])
    ref = torch.tensor([-1.0, -0.5, -2.0])
    zero_adv = torch.zeros(3)
    loss_eq, m_eq, _ = _grad_of_loss(lp, lp, zero_adv, cfg=cfg, ref_logprobs=lp.clone())
    assert m_eq["kl"].item() == 0.0 and loss_eq.item() == 0.0

    loss, m, grad = _grad_of_loss(lp, lp, zero_adv, cfg=cfg, ref_logprobs=ref)
    expected_kl = sum(math.exp(r - l) - (r - l) - 1 for r, l in zip(ref.tolist(), lp.tolist())) / 3
    assert m["kl"].item() == pytest.approx(expected_kl)
    assert m["kl"].item() > 0
    assert loss.item() == pytest.approx(0.5 * expected_kl)
    assert grad[0] == 0
    # descent direction -grad moves logp toward ref
    assert -grad[1] > 0  # ref above logp → increase
    assert -grad[2] < 0  # ref below logp → decrease


def test_kl_requires_ref_logprobs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="reference logprobs"):
        policy_loss(x, x, x, torch.ones(2), cfg=LossConfig(kl_coef=0.1), num_global_tokens=2)


def test_entropy_required_when_coef_positive():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(x, x, x, torch.ones(2), cfg=LossConfig(entropy_coef=0.1), num_global_tokens=2)


def test_entropy_bonus_gradient_increases_entropy():
    torch.manual_seed(0)
    logits = (torch.randn(5, 4) * 3).requires_grad_(True)
    ids = torch.tensor([0, 1, 2, 3, 1])
    cfg = LossConfig(entropy_coef=1.0)
    lp, ent = token_logprobs_and_entropy(logits, ids, with_entropy=True)
    mask = torch.tensor([False, True, True, True, True])
    # zero advantages: the loss is only -entropy_coef * mean entropy
    loss, metrics = policy_loss(
        lp, lp.detach(), torch.zeros(5), mask, cfg=cfg, num_global_tokens=4, entropy=ent
    )
    assert metrics["entropy"].item() == pytest.approx(ent[1:].sum().item() / 4)
    assert loss.item() == pytest.approx(-metrics["entropy"].item())
    loss.backward()
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
        _, ent_after = token_logprobs_and_entropy(stepped, ids, with_entropy=True)
    assert ent_after[1:].sum() > ent[1:].sum().detach()


def test_global_normalisation_microbatches_match_whole_batch():
    torch.manual_seed(1)
    n = 11
    lp = torch.randn(n) * 0.3 - 1.0
    old = lp + torch.randn(n) * 0.3
    ref = lp + torch.randn(n) * 0.3
    adv = torch.randn(n)
    ent = torch.rand(n)
    mask = torch.rand(n) > 0.3
    mask[0] = True
    cfg = LossConfig(pos_clip_ratio=0.28, neg_clip_ratio=0.2, kl_coef=0.1, entropy_coef=0.01)
    total = int(mask.sum())

    whole = lp.clone().requires_grad_(True)
    whole_loss, whole_metrics = policy_loss(
        whole, old, adv, mask, cfg=cfg, num_global_tokens=total, ref_logprobs=ref, entropy=ent
    )
    whole_loss.backward()

    split = lp.clone().requires_grad_(True)
    acc_loss = 0.0
    acc_metrics = {}
    for sl in (slice(0, 3), slice(3, n)):  # micro-batches of different sizes
        loss, metrics = policy_loss(
            split[sl], old[sl], adv[sl], mask[sl], cfg=cfg, num_global_tokens=total,
            ref_logprobs=ref[sl], entropy=ent[sl],
        )
        loss.backward()
        acc_loss += loss.item()
        for k, v in metrics.items():
            acc_metrics[k] = acc_metrics.get(k, 0.0) + v.item()

    assert acc_loss == pytest.approx(whole_loss.item(), abs=1e-6)
    torch.testing.assert_close(split.grad, whole.grad)
    assert set(acc_metrics) == set(whole_metrics) == {"pg_loss", "kl", "entropy", "clip_frac", "loss"}
    for k, v in whole_metrics.items():
        assert acc_metrics[k] == pytest.approx(v.item(), abs=1e-6), k
    # a micro-batch-local mean would give a different answer
    local = sum(
        policy_loss(lp[sl], old[sl], adv[sl], mask[sl], cfg=cfg, num_global_tokens=int(mask[sl].sum()),
                    ref_logprobs=ref[sl], entropy=ent[sl])[0].item() / 2
        for sl in (slice(0, 3), slice(3, n))
    )
    assert local != pytest.approx(whole_loss.item(), abs=1e-6)


def test_loss_mask_excludes_tokens():
    lp = torch.tensor([-1.0, -1.0, -1.0])
    old = torch.tensor([-1.0, -1.5, -1.0])
    adv = torch.tensor([1.0, 5.0, -2.0])
    mask = torch.tensor([1, 0, 1])
    loss, metrics, grad = _grad_of_loss(lp, old, adv, mask=mask, n=2)
    assert grad[1] == 0
    assert grad[0] != 0 and grad[2] != 0
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 2)
    # garbage (inf) in a masked-out token does not leak into the loss
    lp_bad = lp.clone()
    lp_bad[1] = float("inf")
    loss_bad, _ = policy_loss(lp_bad, old, adv, mask, cfg=LossConfig(), num_global_tokens=2)
    assert loss_bad.item() == pytest.approx(loss.item())


def _naive(logits, ids, temperature):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    taken = logp[..., :-1, :].gather(-1, ids[..., 1:].unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)[..., :-1]
    pad = torch.zeros(*ids.shape[:-1], 1)
    return torch.cat([pad, taken], -1), torch.cat([pad, ent], -1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 1024])
def test_token_logprobs_match_naive(temperature, chunk_size):
    torch.manual_seed(2)
    length, vocab = 9, 13  # L-1 = 8 predicted positions: chunk 3 leaves a ragged tail, chunk 4 divides
    logits = torch.randn(length, vocab) * 2
    ids = torch.randint(0, vocab, (length,))
    lp, ent = token_logprobs_and_entropy(logits, ids, temperature, with_entropy=True, chunk_size=chunk_size)
    ref_lp, ref_ent = _naive(logits, ids, temperature)
    assert lp.dtype == torch.float32 and lp.shape == (length,)
    assert lp[0] == 0 and ent[0] == 0
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    lp_only, none = token_logprobs_and_entropy(logits, ids, temperature, chunk_size=chunk_size)
    assert none is None
    torch.testing.assert_close(lp_only, ref_lp)


def test_token_logprobs_batched_bf16_and_grad():
    torch.manual_seed(3)
    logits = (torch.randn(3, 7, 11) * 2).to(torch.bfloat16)
    ids = torch.randint(0, 11, (3, 7))
    lp, ent = token_logprobs_and_entropy(logits, ids, 0.9, with_entropy=True, chunk_size=4)
    ref_lp, ref_ent = _naive(logits, ids, 0.9)
    assert lp.shape == ent.shape == (3, 7) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    for b in range(3):
        row_lp, _ = token_logprobs_and_entropy(logits[b], ids[b], 0.9)
        torch.testing.assert_close(lp[b], row_lp)

    # gradients through the chunked (recomputed) path equal the naive ones
    base = torch.randn(2, 6, 5)
    ids2 = torch.randint(0, 5, (2, 6))
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    lp_a, ent_a = token_logprobs_and_entropy(a, ids2, 1.3, with_entropy=True, chunk_size=2)
    (lp_a.sum() + 0.5 * ent_a.sum()).backward()
    lp_b, ent_b = _naive(b, ids2, 1.3)
    (lp_b.sum() + 0.5 * ent_b.sum()).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_token_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), temperature=0.0)


# ---- truncated importance sampling (TIS) -----------------------------------------------------------
# rollout (behaviour) logprobs, and the trainer's before the episode's update: the IS ratios
# exp(prox - old) are 1, e, 1/e and 1.5, so a cap of 2 truncates (or masks) the second token only
TIS_OLD = torch.tensor([-1.0, -2.0, -0.5, -1.5])
TIS_PROX = torch.tensor([-1.0, -1.0, -1.5, -1.5 + math.log(1.5)])
TIS_ADV = torch.tensor([1.0, 1.0, -1.0, 2.0])


def test_tis_truncate_weights_each_token_by_its_capped_ratio():
    cfg = LossConfig(tis_cap=2.0)
    # the trainer's logprobs equal the proximal ones (the episode's first optimizer step): PPO ratio 1
    loss, m, grad = _grad_of_loss(TIS_PROX.clone(), TIS_OLD, TIS_ADV, cfg=cfg, proximal_logprobs=TIS_PROX)
    weights = [1.0, 2.0, math.exp(-1), 1.5]   # e truncated to 2
    expected = [-w * a for w, a in zip(weights, TIS_ADV.tolist())]
    assert m["pg_loss"].item() == pytest.approx(sum(expected) / 4)
    assert grad.tolist() == pytest.approx([e / 4 for e in expected])   # d(-w A ratio)/d logprob at ratio 1
    assert m["tis_ratio_mean"].item() == pytest.approx((1 + math.e + math.exp(-1) + 1.5) / 4)
    assert m["tis_ratio_min"].item() == pytest.approx(math.exp(-1))
    assert m["tis_ratio_max"].item() == pytest.approx(math.e)
    assert m["tis_clip_frac"].item() == pytest.approx(1 / 4)
    assert m["clip_frac"].item() == 0


def test_tis_mask_drops_the_tokens_above_the_cap():
    cfg = LossConfig(tis_cap=2.0, tis_mode="mask")
    _, m, grad = _grad_of_loss(TIS_PROX.clone(), TIS_OLD, TIS_ADV, cfg=cfg, proximal_logprobs=TIS_PROX)
    weights = [1.0, 0.0, math.exp(-1), 1.5]
    expected = [-w * a for w, a in zip(weights, TIS_ADV.tolist())]
    assert m["pg_loss"].item() == pytest.approx(sum(expected) / 4)
    assert grad.tolist() == pytest.approx([e / 4 for e in expected])
    assert grad[1] == 0 and m["tis_clip_frac"].item() == pytest.approx(1 / 4)


def test_tis_ppo_ratio_is_against_the_proximal_policy_and_still_clipped():
    """Later optimizer steps: the trainer moved away from the proximal policy; PPO clips that move,
    and the IS weight (against the rollout) multiplies the clipped term."""
    cfg = LossConfig(tis_cap=5.0)
    old, prox = torch.tensor([-2.0, -2.0]), torch.tensor([-1.0, -1.0])   # IS weight e for both
    lp = prox + torch.log(torch.tensor([1.5, 1.1]))   # PPO ratios 1.5 (clipped at 1.2) and 1.1
    _, m, grad = _grad_of_loss(lp, old, torch.ones(2), cfg=cfg, proximal_logprobs=prox)
    assert m["pg_loss"].item() == pytest.approx(-math.e * (1.2 + 1.1) / 2)
    assert grad[0] == 0 and grad[1].item() == pytest.approx(-math.e * 1.1 / 2)
    assert m["clip_frac"].item() == pytest.approx(1 / 2)


def test_tis_without_proximal_logprobs_uses_this_forward_as_a_constant():
    """The episode's first optimizer step: the weight comes from the detached logprobs, so the gradient
    is -w A (no derivative through w, which would double it)."""
    cfg = LossConfig(tis_cap=10.0)
    lp, old = torch.tensor([-0.5]), torch.tensor([-1.0])
    loss, m, grad = _grad_of_loss(lp, old, torch.ones(1), cfg=cfg)
    assert loss.item() == pytest.approx(-math.exp(0.5))
    assert grad.item() == pytest.approx(-math.exp(0.5))
    assert m["tis_ratio_mean"].item() == pytest.approx(math.exp(0.5))


def test_tis_is_the_plain_loss_when_trainer_and_rollout_agree():
    """On-policy, with the trainer's logprobs equal to the rollout's, every weight is 1: the same
    loss and gradient as without TIS (the synchronous loop loses nothing by turning it on)."""
    old = torch.tensor([-1.0, -2.0, -0.7])
    lp = old + torch.tensor([0.3, -0.4, 0.1])
    adv = torch.tensor([1.0, -1.0, 0.5])
    plain = _grad_of_loss(lp, old, adv)
    tis = _grad_of_loss(lp, old, adv, cfg=LossConfig(tis_cap=2.0), proximal_logprobs=old.clone())
    assert tis[0].item() == pytest.approx(plain[0].item())
    assert tis[2].tolist() == pytest.approx(plain[2].tolist())
    assert tis[1]["tis_ratio_min"] == tis[1]["tis_ratio_max"] == 1


def test_proximal_logprobs_without_tis_are_refused():
    with pytest.raises(ValueError, match="tis_cap"):
        _grad_of_loss(TIS_PROX.clone(), TIS_OLD, TIS_ADV, proximal_logprobs=TIS_PROX)
    with pytest.raises(ValueError, match="tis_cap"):
        LossConfig(tis_cap=0.5)
    with pytest.raises(ValueError, match="tis_mode"):
        LossConfig(tis_cap=2.0, tis_mode="clip")


def test_step_metrics_combine_sums_and_extremes():
    """Micro-batches of a step: normalised metrics add up (times the rank's share), extremes take
    the min / max; a micro-batch without loss tokens reports +-inf extremes, which never win."""
    from services.trainer.loss import combine_metrics
    totals: dict[str, float] = {}
    combine_metrics(totals, {"pg_loss": 0.5, "tis_ratio_min": 0.9, "tis_ratio_max": 1.2}, share=0.5)
    combine_metrics(totals, {"pg_loss": 0.25, "tis_ratio_min": math.inf, "tis_ratio_max": -math.inf}, share=0.5)
    combine_metrics(totals, {"pg_loss": 1.0, "tis_ratio_min": 0.7, "tis_ratio_max": 1.1}, share=0.5)
    assert totals == {"pg_loss": pytest.approx(0.875), "tis_ratio_min": 0.7, "tis_ratio_max": 1.2}
# ---- the LM head fused with the logprobs --------------------------------------------------------------

def _unfused(hidden, weight, bias, targets, temperature, with_entropy):
    """The reference: the full [N, V] logits, then the chunked float32 logprobs (the trainer's old path)."""
    from services.trainer.loss import selected_logprobs_and_entropy
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return selected_logprobs_and_entropy(logits, targets, temperature, with_entropy)


def _leaves(dtype, bias: bool, n=11, h=6, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.7).to(dtype)
    b = (torch.randn(v, generator=g) * 0.3).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    coef = torch.randn(2, n, generator=g)   # a loss that weighs every token's logprob and entropy differently
    return hidden, weight, b, targets, coef


# float32: the same math, chunked; bf16: the logits are rounded to bf16 in both paths, the fused one adds
# the weight gradient over chunks in bf16 (the unfused one in one GEMM), so gradients agree to bf16 precision
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_entropy", [True, False], ids=["entropy", "logprobs"])
@pytest.mark.parametrize(("chunk_size", "bias", "temperature"), [(3, False, 0.7), (4, True, 1.0), (None, False, 1.6)])
def test_fused_head_equals_the_unfused_logprobs_entropy_and_gradients(dtype, with_entropy, chunk_size, bias,
                                                                      temperature):
    from services.trainer.loss import fused_head_logprobs_and_entropy
    leaves, coef = _leaves(dtype, bias)[:-1], _leaves(dtype, bias)[-1]
    results = []
    for fused in (True, False):
        hidden, weight, b, targets = [t.clone().requires_grad_(t.is_floating_point()) if t is not None else None
                                      for t in leaves]
        if fused:
            lp, ent = fused_head_logprobs_and_entropy(hidden, weight, targets, temperature, with_entropy, bias=b,
                                                      chunk_size=chunk_size)
        else:
            lp, ent = _unfused(hidden, weight, b, targets, temperature, with_entropy)
        loss = (coef[0] * lp).sum() + ((coef[1] * ent).sum() if with_entropy else 0)
        loss.backward()
        results.append((lp, ent, hidden.grad, weight.grad, b.grad if b is not None else None))
    for got, want in zip(*results):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_fused_head_never_holds_the_logits_of_every_row():
    """Every tensor made in forward and backward is at most one chunk of logits: chunk x vocab, never N x V."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from services.trainer.loss import fused_head_logprobs_and_entropy

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    hidden, weight, _, targets, coef = _leaves(torch.float32, False, n=64, h=4, v=300)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with Largest():
        lp, ent = fused_head_logprobs_and_entropy(hidden, weight, targets, 1.0, True, chunk_size=8)
        ((coef[0] * lp).sum() + (coef[1] * ent).sum()).backward()
    assert Largest.numel == 8 * 300   # one chunk's logits (the weight itself is 4 x 300)
    with Largest():
        lp, ent = _unfused(hidden, weight, None, targets, 1.0, True)
        ((coef[0] * lp).sum() + (coef[1] * ent).sum()).backward()
    assert Largest.numel == 64 * 300   # the unfused path does hold them


def test_fused_head_refuses_bad_shapes():
    from services.trainer.loss import fused_head_logprobs_and_entropy
    with pytest.raises(ValueError, match="expected hidden"):
        fused_head_logprobs_and_entropy(torch.randn(4, 5), torch.randn(7, 6), torch.zeros(4, dtype=torch.long), 1.0,
                                        False)
    with pytest.raises(ValueError, match="temperature"):
        fused_head_logprobs_and_entropy(torch.randn(4, 5), torch.randn(7, 5), torch.zeros(4, dtype=torch.long), 0.0,
                                        False)
