"""The RL pieces that are plain functions: GRPO's group advantages, the GRPO/CISPO policy loss with its k3 KL,
and the rule rewards (minimind/losses.py, minimind/rewards.py)."""
import pytest
import torch

from minimind.losses import group_advantages, policy_loss
from minimind.rewards import Rewards, parse_reward, split_weight


def test_group_advantages_are_standardised_per_group_and_zero_for_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, group_size=4)
    assert torch.equal(adv[:4], torch.zeros(4))                        # all equal: nothing to learn
    assert adv[4:].tolist() == pytest.approx([-1, 1, -1, 1], abs=1e-3)  # mean 0.5, std 0.5
    assert torch.equal(group_advantages(torch.tensor([3.0, 5.0]), group_size=1), torch.zeros(2))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.ones(5), group_size=4)


def _logprobs(B=3, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(B, T, generator=g) * 3


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_at_the_first_step_the_ratio_is_one_and_the_kl_zero(loss_type):
    """policy = rollout weights = reference: ratio 1, KL 0, nothing clipped, and the gradient of each token's
    log-prob is -A (times its mask) over the token count, as in plain REINFORCE with these advantages."""
    old = _logprobs()
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    loss, m = policy_loss(logp, old, old, adv, mask, clip_eps=0.2, kl_coef=0.1, loss_type=loss_type)
    assert m["ratio"].item() == pytest.approx(1.0) and m["kl"].item() == 0.0 and m["clip_fraction"].item() == 0.0
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / mask.sum(), atol=1e-6)


def test_grpo_clipping_takes_effect_at_the_stated_epsilon():
    """A positive advantage: a token whose ratio is past 1 + eps gets no gradient, one within it does; with
    a negative advantage the same happens below 1 - eps. CISPO keeps a gradient on every token, its weight
    capped at 1 + eps."""
    eps = 0.2
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.1, 1.3, 0.9, 0.7]])
    mask = torch.ones(1, 4)
    for adv, dead in ((1.0, [False, True, False, False]), (-1.0, [False, False, False, True])):
        logp = ratios.log().clone().requires_grad_(True)
        loss, m = policy_loss(logp, old, logp.detach(), torch.tensor([adv]), mask, clip_eps=eps, reduction="sum")
        loss.backward()
        assert (logp.grad[0] == 0).tolist() == dead
        assert m["clip_fraction"].item() == pytest.approx(0.5)         # 1.3 and 0.7 lie outside [0.8, 1.2]
        # Where it is not clipped, d(-ratio * A)/d logp = -ratio * A.
        alive = ~torch.tensor(dead)
        assert torch.allclose(logp.grad[0][alive], -ratios[0][alive] * adv)
    logp = ratios.log().clone().requires_grad_(True)
    loss, m = policy_loss(logp, old, logp.detach(), torch.tensor([1.0]), mask, clip_eps=eps, loss_type="cispo",
                          reduction="sum")
    loss.backward()
    assert torch.allclose(logp.grad[0], -ratios[0].clamp(max=1 + eps))
    assert m["clip_fraction"].item() == pytest.approx(0.25)


def test_k3_kl_is_positive_and_estimates_the_kl_to_the_reference():
    """Sampled from the policy, k3 = exp(ref - logp) - (ref - logp) - 1 averages to KL(pi || ref)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, generator=g), 0)
    q = torch.softmax(torch.randn(50, generator=g), 0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)[None]
    logp, ref = p.log()[tokens], q.log()[tokens]
    _, m = policy_loss(logp, logp, ref, torch.zeros(1), torch.ones_like(logp), kl_coef=1.0)
    exact = (p * (p.log() - q.log())).sum().item()
    assert m["kl"].item() == pytest.approx(exact, rel=0.03) and m["kl"].item() > 0


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """A module of the user's own reward functions, importable as `user_rewards`."""
    (tmp_path / "user_rewards.py").write_text(
        "def has_two(prompt, completion):\n    return float('2' in completion)\n\n"
        "def broken(prompt, completion):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards"


def test_rule_rewards(user_rewards):
    good = "<think>\n一加一。\n</think>\n<answer>\n2\n</answer>"
    assert parse_reward("format").fn("q", good) == 1.0
    assert parse_reward("format").fn("q", "<answer>2</answer>") == 0.0
    assert parse_reward("format").fn("q", good + " trailing text") == 0.0
    length = parse_reward("length:10").fn
    assert (length("q", "x" * 10), length("q", "x" * 15), length("q", "x" * 30)) == (1.0, 0.5, 0.0)
    words = parse_reward("length:2", count_tokens=lambda s: len(s.split())).fn
    assert words("q", "two words") == 1.0
    assert parse_reward("regex:[春秋]").fn("q", "春眠不觉晓") == 1.0
    assert parse_reward("regex:[春秋]").fn("q", "床前明月光") == 0.0
    assert split_weight("regex:a=b") == ("regex:a=b", 1.0) and split_weight("format=0.5") == ("format", 0.5)
    assert split_weight("regex:x{2}=2.5") == ("regex:x{2}", 2.5)
    total, values = Rewards(["format=0.5", "regex:一=2", f"{user_rewards}:has_two=-1"]).score("q", good)
    assert values == {"format": 1.0, "regex:一": 1.0, f"{user_rewards}:has_two": 1.0}
    assert total == pytest.approx(0.5 + 2 - 1)


def test_bad_reward_specs_are_clear_errors(user_rewards):
    for spec, message in [("fromat", "unknown reward"), ("length:x", "integer N"), ("length:0", "N >= 1"),
                          ("regex:[", "not a valid regular expression"), ("nosuchmodule:f", "cannot import"),
                          ("math:pi", "not callable"), ("format=inf", "finite")]:
        with pytest.raises(ValueError, match=message):
            parse_reward(spec)
    with pytest.raises(ValueError, match="at least one"):
        Rewards([])
    with pytest.raises(ValueError, match="must be finite"):
        Rewards([f"{user_rewards}:broken"]).score("q", "a")
