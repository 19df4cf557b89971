"""Training losses as small plain functions of tensors: testable without Ray, a GPU or a model.

Shapes: logits (B, T, V); targets (B, T) token ids; weights (B, T) float per-target weights (0 = ignore,
1 = normal, 10 = a reasoning tag token, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position: (B, T). Computed in fp32 without materialising full log-softmax twice."""
    logits = logits.float()
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def _reduce(total: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count.clamp_min(1e-8)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
            reduction: str = "mean") -> torch.Tensor:
    """Weighted next-token cross-entropy: sum(w * ce), divided by sum(w) for reduction="mean" (MiniMind's
    normalisation of one batch). Training uses "sum" and lets the loop divide by the whole step's sum(w)."""
    ce = -token_logprobs(logits, targets)  # (B, T)
    weights = weights.to(ce.dtype)
    return _reduce((ce * weights).sum(), weights.sum(), reduction)


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-averaged log-probability of each sequence's masked tokens: (B,). MiniMind's DPO uses the mean."""
    lp = token_logprobs(logits, targets)
    mask = mask.to(lp.dtype)
    return (lp * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1, reduction: str = "mean"):
    """Direct Preference Optimisation (Rafailov et al. 2023), on per-sequence log-probs (B,):

        loss = -log sigmoid( beta * [ (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) ] )

    Returns (loss, metrics) with reward accuracy and margin, the implicit rewards being
    beta * (log pi - log ref). The loss is per pair: "sum" adds the pairs' losses, "mean" averages them.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    per_pair = -F.logsigmoid(margin)
    loss = _reduce(per_pair.sum(), torch.tensor(float(len(per_pair))), reduction)
    metrics = {
        "reward_accuracy": (margin > 0).float().mean().detach(),
        "reward_margin": margin.mean().detach(),
        "chosen_reward": chosen_reward.mean().detach(),
        "rejected_reward": rejected_reward.mean().detach(),
    }
    return loss, metrics


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor, alpha: float = 0.5, temperature: float = 1.0, reduction: str = "mean"):
    """White-box distillation (Hinton et al. 2015) on the masked tokens:

        loss = alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))

    The T^2 factor keeps the soft-target gradients on the scale of the hard-target ones. Both terms are per
    masked token: "sum" adds them over the mask's weights, "mean" divides by sum(mask).
    Returns (loss, metrics); the metrics ("ce", "kl") are always per-token means.
    """
    mask = mask.to(torch.float32)
    count = mask.sum()
    ce = lm_loss(student_logits, targets, mask, reduction="sum")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl_per_token = (t.exp() * (t - s)).sum(-1)  # (B, T)
    kl = (kl_per_token * mask).sum()
    loss = _reduce(alpha * ce + (1 - alpha) * temperature ** 2 * kl, count, reduction)
    per_token = count.clamp_min(1e-8)
    return loss, {"ce": (ce / per_token).detach(), "kl": (kl / per_token).detach()}


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024): each completion's reward standardised within the group of
    `group_size` completions of the same prompt, A = (r - mean) / (std + eps). rewards: (N,) with the groups
    consecutive; returns (N,). A group whose rewards are all equal teaches nothing: its advantages are 0."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size {group_size}, got "
                         f"{tuple(rewards.shape)}")
    groups = rewards.float().view(-1, group_size)
    std = groups.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.0,
                loss_type: str = "grpo", reduction: str = "mean"):
    """The policy-gradient loss of GRPO or CISPO on completion tokens, averaged over tokens (not sequences).

    logprobs: (B, T) log pi(token) under the policy being trained (with grad); old_logprobs: the same under
    the weights that sampled the completion (the rollout's); ref_logprobs: under the frozen reference;
    advantages: (B,) one per completion; mask: (B, T) 1 on completion tokens.

      ratio  = exp(logp - old_logp)
      grpo:  per-token -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)            (PPO's clipped surrogate)
      cispo: per-token -stopgrad(min(ratio, 1 + eps)) * A * logp   (MiniMax-M1: the importance weight is clipped
             instead of the update, so every token keeps a gradient)
      + kl_coef * k3, k3 = exp(ref - logp) - (ref - logp) - 1  (Schulman's unbiased, non-negative estimator of
        KL(pi || ref))
    "sum" adds the per-token terms over the mask (the loop divides by the step's token count), "mean" divides
    by the mask's sum. Returns (loss, metrics): kl, clip fraction (tokens whose ratio is outside the clip
    range for grpo, capped for cispo), mean ratio, all per token.
    """
    if loss_type not in ("grpo", "cispo"):
        raise ValueError(f"loss_type must be 'grpo' or 'cispo', got {loss_type!r}")
    mask = mask.to(torch.float32)
    logprobs, old_logprobs, ref_logprobs = logprobs.float(), old_logprobs.float(), ref_logprobs.float()
    adv = advantages.float()[:, None]                                   # (B, 1)
    ratio = torch.exp(logprobs - old_logprobs)                          # (B, T)
    if loss_type == "grpo":
        clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
        per_token = -torch.min(ratio * adv, clipped * adv)
        was_clipped = (ratio - clipped).abs() > 0
    else:
        weight = ratio.clamp(max=1 + clip_eps).detach()
        per_token = -weight * adv * logprobs
        was_clipped = ratio > 1 + clip_eps
    log_ref_ratio = ref_logprobs - logprobs
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1                 # (B, T), >= 0
    per_token = per_token + kl_coef * k3
    count = mask.sum()
    loss = _reduce((per_token * mask).sum(), count, reduction)
    tokens = count.clamp_min(1e-8)
    metrics = {"kl": ((k3 * mask).sum() / tokens).detach(),
               "clip_fraction": ((was_clipped.float() * mask).sum() / tokens).detach(),
               "ratio": ((ratio * mask).sum() / tokens).detach()}
    return loss, metrics
