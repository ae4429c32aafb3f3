"""The GRPO / PPO-clip policy loss shared by every trainer backend.

All loss inputs are flat 1-D tensors over the tokens of one micro-batch
(packed rows are flattened), aligned so that index ``t`` refers to token ``t``.
Every term is normalised by the number of loss tokens in the whole optimizer
step (``num_global_tokens``), so summing micro-batch losses under gradient
accumulation, across micro-batches and ranks of different sizes, yields exactly
the gradient of the token mean over the global batch.

Three log-probabilities of a sampled token appear here (see :func:`policy_loss`):
the rollout engine's (``old_logprobs``, the behaviour policy that sampled it, at
the policy version the sample carries), the trainer's before this episode's
update (``proximal_logprobs``, computed without grad) and the trainer's now
(``logprobs``, with grad).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch.utils.checkpoint import checkpoint

from services.common.config import PolicyTrainerConfig


@dataclass(frozen=True)
class LossConfig:
    """Coefficients of the policy loss.

    Attributes:
        pos_clip_ratio: the importance ratio is clipped at ``1 + pos_clip_ratio``
            (for positive advantages this bounds how far a token's probability
            is pushed up in one step).
        neg_clip_ratio: the importance ratio is clipped at ``1 - neg_clip_ratio``
            (for negative advantages this bounds how far it is pushed down).
        kl_coef: weight of the k3 KL estimator to the frozen reference policy.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        tis_cap: truncated importance sampling on (``None``: off). Each token's
            policy-gradient term is weighted by the trainer/rollout probability
            ratio, capped here (see :func:`policy_loss`).
        tis_mode: ``"truncate"``: a weight above the cap becomes the cap;
            ``"mask"``: a token whose weight exceeds the cap is left out (weight 0).
    """

    pos_clip_ratio: float = 0.2
    neg_clip_ratio: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    tis_mode: str = "truncate"

    @classmethod
    def of(cls, trainer_cfg: PolicyTrainerConfig) -> LossConfig:
        """The loss of ``models.policy_trainer``: every backend builds it here."""
        t = trainer_cfg
        return cls(pos_clip_ratio=t.pos_clip_ratio, neg_clip_ratio=t.neg_clip_ratio, kl_coef=t.kl_coef,
                   entropy_coef=t.entropy_coef, tis_cap=t.tis_cap, tis_mode=t.tis_mode)

    def __post_init__(self) -> None:
        if self.pos_clip_ratio < 0:
            raise ValueError(f"pos_clip_ratio must be >= 0, got {self.pos_clip_ratio}")
        if not 0 <= self.neg_clip_ratio < 1:
            raise ValueError(f"neg_clip_ratio must be in [0, 1), got {self.neg_clip_ratio}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.tis_cap is not None and not self.tis_cap >= 1:
            raise ValueError(f"tis_cap must be >= 1 or None, got {self.tis_cap}")
        if self.tis_mode not in ("truncate", "mask"):
            raise ValueError(f"tis_mode must be truncate or mask, got {self.tis_mode!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    cfg: LossConfig,
    num_global_tokens: int,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    proximal_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy loss with asymmetric clipping, k3 KL, entropy bonus and, when
    ``cfg.tis_cap`` is set, truncated importance sampling (TIS).

    Without TIS, per token ``t`` with ``ratio = exp(logprobs - old_logprobs)``::

        pg  = max(-A * ratio, -A * clamp(ratio, 1 - neg_clip_ratio, 1 + pos_clip_ratio))
        kl  = exp(ref - logprobs) - (ref - logprobs) - 1          # k3, >= 0
        loss = sum_t mask_t * (pg + kl_coef * kl - entropy_coef * entropy) / num_global_tokens

    With TIS (decoupled PPO: the rollout's policy samples, the trainer's policy before this
    episode's update is the one PPO stays close to)::

        prox   = proximal_logprobs, or logprobs.detach() when not given
        ratio  = exp(logprobs - prox)                     # clipped as above
        is     = exp(prox - old_logprobs)                 # trainer / rollout probability of the token
        w      = min(is, tis_cap)                         # tis_mode=truncate
               = is if is <= tis_cap else 0               # tis_mode=mask
        pg     = w * max(-A * ratio, -A * clamp(ratio, ...))

    ``is`` corrects for the samples coming from another policy than the trainer's: an older
    version (``runtime_args.off_policy_steps``) and the rollout engine's numerics. Its cap bounds
    the variance (truncated IS; masking drops the tokens instead). ``prox`` is the trainer's
    logprob under the weights it had at the start of the episode's training: in the episode's
    first optimizer step those are the weights of this very forward, so ``logprobs.detach()`` is
    exact; later optimizer steps receive it computed before the episode's first one.

    Args:
        logprobs: [T] log-probabilities of the taken tokens under the current
            policy (carries the gradient).
        old_logprobs: [T] log-probabilities under the policy that generated the
            samples: the rollout engine's (treated as constants).
        advantages: [T] per-token advantages.
        loss_mask: [T] bool or 0/1 mask; tokens with 0 contribute nothing.
        cfg: loss coefficients.
        num_global_tokens: number of loss tokens in the whole optimizer step,
            over all micro-batches and ranks. Every term is a masked sum divided
            by this number.
        ref_logprobs: [T] log-probabilities under the frozen reference policy.
            Required when ``cfg.kl_coef > 0``; when given, the KL is reported
            even if ``cfg.kl_coef == 0``.
        entropy: [T] entropy of the current policy's predicting distribution
            per token (see :func:`token_logprobs_and_entropy`). Required when
            ``cfg.entropy_coef > 0``; when given, it is reported even if
            ``cfg.entropy_coef == 0``.
        proximal_logprobs: [T] the trainer's log-probabilities before the
            episode's first optimizer step (TIS only; treated as constants).

    Returns:
        ``(loss, metrics)``. ``loss`` is a scalar to backpropagate. ``metrics``
        holds detached scalars normalised like the loss, so they add up over
        the micro-batches of a step: ``"pg_loss"``, ``"clip_frac"`` (fraction of
        loss tokens whose clipped term was active), ``"kl"`` (0 when no
        ``ref_logprobs`` were given), ``"entropy"`` (only when ``entropy`` is
        given) and ``"loss"``. With TIS also ``"tis_ratio_mean"`` and
        ``"tis_clip_frac"`` (fraction of loss tokens whose ``is`` exceeds the cap),
        which add up the same way, and ``"tis_ratio_min"`` / ``"tis_ratio_max"``,
        which combine by min / max (:func:`combine_metrics`; +-inf without loss tokens).

    Raises:
        ValueError: on shape mismatches, a non-positive ``num_global_tokens``,
            a missing ``ref_logprobs`` / ``entropy`` needed by ``cfg``, or
            ``proximal_logprobs`` given without TIS.
    """
    if num_global_tokens <= 0:
        raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(
            f"kl_coef={cfg.kl_coef} > 0 but ref_logprobs is None: the trainer must compute "
            "reference logprobs with the frozen reference policy when the KL term is enabled"
        )
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(
            f"entropy_coef={cfg.entropy_coef} > 0 but entropy is None: the trainer must compute "
            "per-token entropy (token_logprobs_and_entropy(..., with_entropy=True))"
        )
    if proximal_logprobs is not None and cfg.tis_cap is None:
        raise ValueError("proximal_logprobs are given but tis_cap is None: they are used only by truncated "
                         "importance sampling")
    named = {"old_logprobs": old_logprobs, "advantages": advantages, "loss_mask": loss_mask,
             "ref_logprobs": ref_logprobs, "entropy": entropy, "proximal_logprobs": proximal_logprobs}
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be 1-D over flattened tokens, got shape {tuple(logprobs.shape)}")
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(logprobs.shape)} like logprobs"
            )

    mask = loss_mask.to(torch.bool)

    def masked_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values, torch.zeros_like(values)).sum() / num_global_tokens

    tis = cfg.tis_cap is not None
    if tis:
        prox = (proximal_logprobs if proximal_logprobs is not None else logprobs).detach()
        ratio = torch.exp(logprobs - prox)
    else:
        ratio = torch.exp(logprobs - old_logprobs.detach())
    clipped_ratio = torch.clamp(ratio, 1.0 - cfg.neg_clip_ratio, 1.0 + cfg.pos_clip_ratio)
    unclipped_obj = -advantages * ratio
    clipped_obj = -advantages * clipped_ratio
    pg_term = torch.maximum(unclipped_obj, clipped_obj)
    metrics: dict[str, torch.Tensor] = {}
    if tis:
        is_ratio = torch.exp(prox - old_logprobs.detach())
        over = is_ratio > cfg.tis_cap
        weight = (torch.clamp(is_ratio, max=cfg.tis_cap) if cfg.tis_mode == "truncate"
                  else torch.where(over, torch.zeros_like(is_ratio), is_ratio))
        pg_term = weight * pg_term
        inf = torch.full_like(is_ratio, math.inf)
        metrics.update(tis_ratio_mean=masked_mean(is_ratio), tis_clip_frac=masked_mean(over.to(is_ratio.dtype)),
                       tis_ratio_min=torch.where(mask, is_ratio, inf).min(),
                       tis_ratio_max=torch.where(mask, is_ratio, -inf).max())
    pg_loss = masked_mean(pg_term)
    clip_frac = masked_mean((clipped_obj > unclipped_obj).to(logprobs.dtype))

    loss = pg_loss
    metrics.update(pg_loss=pg_loss, clip_frac=clip_frac)

    if ref_logprobs is not None:
        log_ratio = ref_logprobs.detach() - logprobs
        kl = masked_mean(torch.exp(log_ratio) - log_ratio - 1.0)
        metrics["kl"] = kl
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl
    else:
        metrics["kl"] = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)

    if entropy is not None:
        mean_entropy = masked_mean(entropy)
        metrics["entropy"] = mean_entropy
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * mean_entropy

    metrics["loss"] = loss
    return loss, {k: v.detach() for k, v in metrics.items()}


# How the metrics of micro-batches (and of ranks) combine into a step's: by min / max for the
# extremes, named by these suffixes; everything else is normalised like the loss and adds up.
EXTREMES = {"_min": min, "_max": max}


def combine_metrics(totals: dict[str, float], metrics: Mapping[str, float | torch.Tensor], share: float = 1.0) -> None:
    """Folds one micro-batch's loss metrics into the step's `totals`: sums (times `share`, the part of
    the micro-batch this rank reports), except the extremes (EXTREMES), which take the min or max."""
    for key, value in metrics.items():
        value = float(value)
        pick = next((f for suffix, f in EXTREMES.items() if key.endswith(suffix)), None)
        if pick is None:
            totals[key] = totals.get(key, 0.0) + value * share
        else:
            totals[key] = pick(totals[key], value) if key in totals else value


def _chunk_stats(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probability of ``targets``, entropy (or None) and log-normaliser under
    ``softmax(logits / temperature)``; ``logits`` [C, V] in any float dtype, computed in float32."""
    scaled = logits.float() / temperature
    log_norm = torch.logsumexp(scaled, dim=-1)
    logprobs = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return logprobs, None, log_norm
    probs = torch.exp(scaled - log_norm.unsqueeze(-1))
    entropy = log_norm - (probs * scaled).sum(dim=-1)
    return logprobs, entropy, log_norm


def _chunk_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``targets`` and entropy under ``softmax(logits / temperature)``.

    ``logits`` is [C, V] (any float dtype), ``targets`` is [C]; computed in float32.
    """
    logprobs, entropy, _ = _chunk_stats(logits, targets, temperature, with_entropy)
    return logprobs, entropy


def selected_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``targets[i]`` (and the entropy) under ``softmax(logits[i] / temperature)``,
    for logits [N, V] already taken at the predicting positions (e.g. the model's ``logits_to_keep``).

    Computed in float32, ``chunk_size`` rows at a time; under autograd each chunk is checkpointed:
    only the (already alive) logits slice is kept for backward and the float32 chunk is recomputed,
    so the float32 [N, V] intermediates are never held all at once.
    """
    lp_parts = [logits.new_zeros(0, dtype=torch.float32)]
    ent_parts = [logits.new_zeros(0, dtype=torch.float32)]
    recompute = torch.is_grad_enabled() and logits.requires_grad
    for start in range(0, targets.shape[0], chunk_size):
        chunk = (logits[start: start + chunk_size], targets[start: start + chunk_size], temperature, with_entropy)
        lp, ent = (checkpoint(_chunk_logprobs_and_entropy, *chunk, use_reentrant=False) if recompute
                   else _chunk_logprobs_and_entropy(*chunk))
        lp_parts.append(lp)
        if with_entropy:
            ent_parts.append(ent)
    return torch.cat(lp_parts), (torch.cat(ent_parts) if with_entropy else None)


def _row_logprobs_and_entropy(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float, with_entropy: bool, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs_and_entropy` for one row: logits [L, V], input_ids [L]."""
    lp, ent = selected_logprobs_and_entropy(logits[:-1], input_ids[1:], temperature, with_entropy, chunk_size)
    first = logits.new_zeros(min(len(input_ids), 1), dtype=torch.float32)   # token 0 has no prediction
    return torch.cat([first, lp]), (torch.cat([first, ent]) if with_entropy else None)


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities (and entropies) of a causal LM's own input.

    For a row of logits [L, V] over ``input_ids`` [L]::

        logprobs[t] = log_softmax(logits[t - 1] / temperature)[input_ids[t]]   (t >= 1)
        entropy[t]  = entropy of softmax(logits[t - 1] / temperature)          (t >= 1)
        logprobs[0] = entropy[0] = 0

    Computation is in float32, ``chunk_size`` positions at a time, so a large
    vocabulary never materialises a full float32 [L, V] log-softmax; when the
    logits require grad, chunks are recomputed in backward instead of stored.
    Batched input (logits [B, L, V], input_ids [B, L]) is handled row by row
    with the same semantics.

    Args:
        logits: [L, V] or [B, L, V] logits, any float dtype.
        input_ids: [L] or [B, L] token ids matching ``logits``.
        temperature: sampling temperature the logits are divided by (> 0).
        with_entropy: also return the per-token entropy.
        chunk_size: number of positions processed at once (> 0).

    Returns:
        ``(logprobs, entropy)``, float32 tensors shaped like ``input_ids``;
        ``entropy`` is ``None`` unless ``with_entropy``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if logits.dim() != input_ids.dim() + 1 or logits.shape[:-1] != input_ids.shape or input_ids.dim() not in (1, 2):
        raise ValueError(
            f"expected logits [L, V] with input_ids [L] or logits [B, L, V] with input_ids [B, L], "
            f"got logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)}"
        )
    if input_ids.dim() == 1:
        return _row_logprobs_and_entropy(logits, input_ids, temperature, with_entropy, chunk_size)
    rows = [
        _row_logprobs_and_entropy(row_logits, row_ids, temperature, with_entropy, chunk_size)
        for row_logits, row_ids in zip(logits, input_ids)
    ]
    logprobs = torch.stack([lp for lp, _ in rows]) if rows else logits.new_zeros(input_ids.shape, dtype=torch.float32)
    if not with_entropy:
        return logprobs, None
    entropy = torch.stack([ent for _, ent in rows]) if rows else torch.zeros_like(logprobs)
    return logprobs, entropy


# ---- the LM head fused with the logprobs ------------------------------------------------------------

# rows per chunk of the fused head: about this many float32 logits at once (1 GiB)
FUSED_CHUNK_ELEMENTS = 1 << 28


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The LM head on rows of hidden states, in their dtype, as the model's own head computes them."""
    return torch.nn.functional.linear(hidden, weight, bias)


class _FusedHeadLogprobs(torch.autograd.Function):
    """Forward: per chunk of rows, logits = head(hidden), then the float32 logprob / entropy of them;
    only [N]-sized results are kept. Backward: per chunk, the logits are recomputed and their gradient
    is formed in place (d logprob / d s = onehot - p; d entropy / d s = -p (s - log Z + H), s = logits / T)
    and multiplied straight into the hidden-state and weight gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, rows):
        n = hidden.shape[0]
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)
        log_norm = hidden.new_empty(n, dtype=torch.float32)
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            lp, ent, lz = _chunk_stats(_head_logits(hidden[part], weight, bias), targets[part], temperature,
                                       with_entropy)
            logprobs[part], log_norm[part] = lp, lz
            if with_entropy:
                entropy[part] = ent
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm, entropy)
        ctx.temperature, ctx.with_entropy, ctx.rows = temperature, with_entropy, rows
        return logprobs, entropy

    @staticmethod
    def backward(ctx, d_logprobs, d_entropy):
        hidden, weight, bias, targets, log_norm, entropy = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(hidden) if need_h else None
        # accumulated in the weight's dtype, one GEMM with beta=1 per chunk (float32 inside the GEMM)
        d_weight = torch.zeros_like(weight) if need_w else None
        d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            h = hidden[part]
            scaled = _head_logits(h, weight, bias).float().div_(t)
            lz = log_norm[part].unsqueeze(-1)
            probs = torch.exp(scaled - lz)
            dlp = d_logprobs[part].unsqueeze(-1)
            if ctx.with_entropy:   # dlp + dH (s - log Z + H), in place of s
                shift = lz - entropy[part].unsqueeze(-1)
                grad = scaled.sub_(shift).mul_(d_entropy[part].unsqueeze(-1)).add_(dlp).mul_(probs).neg_()
            else:
                grad = probs.mul_(dlp).neg_()
            grad.scatter_add_(-1, targets[part].unsqueeze(-1), dlp)
            grad = grad.div_(t).to(hidden.dtype)
            if need_h:
                d_hidden[part] = grad @ weight
            if need_w:
                d_weight.addmm_(grad.t(), h)
            if need_b:
                d_bias += grad.sum(0, dtype=torch.float32)
        return (d_hidden, d_weight, d_bias.to(bias.dtype) if need_b else None, None, None, None, None)


def fused_head_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`selected_logprobs_and_entropy` of ``head(hidden)`` without the logits: the LM head
    (``weight`` [V, H], optional ``bias``) runs on ``chunk_size`` rows of ``hidden`` [N, H] at a time, so
    neither the [N, V] logits in the model's dtype nor their float32 form (nor their gradient) is ever
    held; backward recomputes each chunk's logits. Same float32 math as the unfused path; the weight's
    gradient is accumulated over chunks in the weight's dtype (tests/unit/test_loss.py states the
    agreement). ``chunk_size`` default: about ``FUSED_CHUNK_ELEMENTS`` logits per chunk."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or \
            targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H], weight [V, H] and targets [N], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(targets.shape)}")
    rows = chunk_size or max(1, FUSED_CHUNK_ELEMENTS // weight.shape[0])
    logprobs, entropy = _FusedHeadLogprobs.apply(hidden, weight, bias, targets, temperature, with_entropy, rows)
    return logprobs, (entropy if with_entropy else None)
