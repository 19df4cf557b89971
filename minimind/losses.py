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
