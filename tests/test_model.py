"""The model core: preset sizes, causality, KV cache, MoE routing, losses, LoRA, sampling."""
import math

import pytest
import torch
import torch.nn.functional as F

from minimind.config import PRESETS, ModelConfig
from minimind.generate import (SamplingParams, generate, make_generator, process_logits, process_rows, sample_rows,
                               stream_generate, token_mask)
from minimind.lora import apply_lora, lora_state_dict, merge_lora
from minimind.losses import distill_loss, dpo_loss, lm_loss, sequence_logprob
from minimind.model import MiniMind


@pytest.mark.parametrize("preset,expected", [
    ("small", 25_829_888), ("base", 104_030_976), ("moe", 145_029_760)])
def test_preset_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = MiniMind(PRESETS[preset])
    assert model.num_parameters() == expected


def test_small_preset_is_minimind2_small():
    cfg = PRESETS["small"]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == \
        (512, 8, 8, 2, 64, 1408, 6400, 1e6, 1e-5)
    assert cfg.tie_word_embeddings


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_causality(preset):
    torch.manual_seed(0)
    model = MiniMind(PRESETS[preset]).eval()
    x = torch.randint(0, 6400, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 17) % 6400
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    # Not bit-equal for MoE: a changed later token changes how many rows each expert's matmul gets.
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_cached_forward_matches_full_forward(preset):
    torch.manual_seed(1)
    model = MiniMind(PRESETS[preset]).eval()
    x = torch.randint(0, 6400, (3, 20))
    cache = model.new_cache(3, 32)
    with torch.no_grad():
        full = model(x).logits
        pieces = [model(x[:, :7], cache=cache).logits]
        pieces += [model(x[:, i:i + 1], cache=cache).logits for i in range(7, 20)]
    assert torch.allclose(full, torch.cat(pieces, 1), atol=1e-5)
    assert cache.lengths.tolist() == [20, 20, 20]


def test_cache_rows_are_independent_slots():
    """Rows of one cache advance separately: what a continuous-batching server relies on."""
    torch.manual_seed(2)
    model = MiniMind(PRESETS["tiny"]).eval()
    a, b = torch.randint(0, 6400, (1, 9)), torch.randint(0, 6400, (1, 5))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(a[:, :8], cache=cache, rows=[0])
        model(b[:, :4], cache=cache, rows=[1])
        step = model(torch.cat([a[:, 8:], b[:, 4:]]), cache=cache, rows=[0, 1]).logits  # one batched step
        ref_a, ref_b = model(a).logits[:, -1], model(b).logits[:, -1]
    assert torch.allclose(step[0, -1], ref_a[0], atol=1e-5)
    assert torch.allclose(step[1, -1], ref_b[0], atol=1e-5)
    # A reset slot is refilled from scratch while the other keeps its state.
    cache.reset([1])
    with torch.no_grad():
        again = model(b, cache=cache, rows=[1]).logits[:, -1]
    assert torch.allclose(again[0], ref_b[0], atol=1e-5)
    assert cache.lengths.tolist() == [9, 5]


@pytest.mark.parametrize("slots", [[0, 1, 2], [3, 1, 0], [4, 2, 5]], ids=["consecutive", "permuted", "gaps"])
def test_cache_paths_match_full_forward(slots):
    """Every way a forward plans its cache access gives the full forward's logits: slice or gathered rows,
    one shared start or per-row starts, causal prefill, a chunk appended after a prefix (masked), decode."""
    torch.manual_seed(5)
    model = MiniMind(PRESETS["tiny"]).eval()
    x = torch.randint(0, 6400, (3, 24))
    cache = model.new_cache(6, 32)
    with torch.no_grad():
        full = model(x).logits
        got = [model(x[:, :6], cache=cache, rows=slots).logits,                   # all rows start at 0
               model(x[:, 6:11], cache=cache, rows=torch.tensor(slots)).logits]   # T > 1 after a prefix
        got += [model(x[:, i:i + 1], cache=cache, rows=slots).logits for i in range(11, 14)]
        assert torch.allclose(full[:, :14], torch.cat(got, 1), atol=1e-5)
        # Rows at different lengths: advance row 0 alone, then decode the batch together.
        steps = [model(x[:1, 14:16], cache=cache, rows=slots[:1]).logits]
        mixed = model(torch.stack([x[0, 16:17], x[1, 14:15], x[2, 14:15]]), cache=cache, rows=slots).logits
    assert torch.allclose(full[:1, 14:16], steps[0], atol=1e-5)
    assert torch.allclose(mixed[0, 0], full[0, 16], atol=1e-5)
    assert torch.allclose(mixed[1:, 0], full[1:, 14], atol=1e-5)
    assert [cache.lengths[s].item() for s in slots] == [17, 15, 15]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("slots", [[0, 1, 2], [4, 0, 2]], ids=["consecutive", "gaps"])
def test_ragged_prefill_matches_one_row_at_a_time(preset, slots):
    """Prompts of 5, 9 and 3 tokens right-padded into one (3, 9) forward: each row's last real position gives
    its own full forward's logits, the cache advances by each row's count, and a chunk appended at per-row
    starts (padded again) and a batched decode after it still match (the padding's K/V are never read)."""
    torch.manual_seed(6)
    model = MiniMind(PRESETS[preset]).double().eval()
    seqs = [torch.randint(0, 6400, (n,)) for n in (5 + 4, 9 + 2, 3 + 6)]  # prompt + a later chunk
    first, second = (5, 9, 3), (4, 2, 6)
    cache = model.new_cache(5, 32, dtype=torch.float64)

    def padded(parts):
        ids = torch.full((3, max(len(p) for p in parts)), 7)
        for i, part in enumerate(parts):
            ids[i, :len(part)] = part
        return ids

    with torch.no_grad():
        got = model(padded([s[:n] for s, n in zip(seqs, first)]), cache=cache, rows=slots, last_only=True,
                    new_tokens=first).logits[:, 0]
        assert [cache.lengths[s].item() for s in slots] == list(first)
        for i, (s, n) in enumerate(zip(seqs, first)):
            assert torch.allclose(got[i], model(s[None, :n]).logits[0, -1], atol=1e-9)
        got = model(padded([s[n:] for s, n in zip(seqs, first)]), cache=cache, rows=slots, last_only=True,
                    new_tokens=second).logits[:, 0]
        for i, s in enumerate(seqs):
            assert torch.allclose(got[i], model(s[None]).logits[0, -1], atol=1e-9)
        nxt = torch.tensor([[11], [12], [13]])
        got = model(nxt, cache=cache, rows=slots, last_only=True).logits[:, 0]
        for i, s in enumerate(seqs):
            assert torch.allclose(got[i], model(torch.cat([s, nxt[i]])[None]).logits[0, -1], atol=1e-9)
        with pytest.raises(ValueError, match="one count in 1..1 per row"):
            model(nxt, cache=cache, rows=slots, new_tokens=[1, 0, 1])


def test_cache_refuses_overflow_and_row_mismatch():
    model = MiniMind(PRESETS["tiny"]).eval()
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="holds 8 positions; 9 needed"):
            model(torch.zeros(1, 9, dtype=torch.long), cache=cache, rows=[0])
        with pytest.raises(ValueError, match="2 cache rows given for a batch of 1"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache, rows=[0, 1])
    assert cache.lengths.tolist() == [0, 0]  # a refused forward leaves the cache as it was


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_greedy_with_cache_equals_recompute(preset):
    torch.manual_seed(3)
    model = MiniMind(PRESETS[preset]).eval()
    # Sharpen the random model so greedy choices are not near-ties decided by rounding.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8)
    prompt = [11, 250, 3000, 42, 7]
    cached = generate(model, prompt, SamplingParams.greedy(48))
    recomputed = generate(model, prompt, SamplingParams.greedy(48), use_cache=False)
    assert len(cached) == 48
    assert cached == recomputed


def test_sampling_controls():
    torch.manual_seed(4)
    model = MiniMind(PRESETS["tiny"]).eval()
    prompt = [5, 6, 7]
    greedy = generate(model, prompt, SamplingParams.greedy(12))
    assert generate(model, prompt, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1)) == greedy
    seeded = SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.9, top_k=50, seed=7)
    assert generate(model, prompt, seeded) == generate(model, prompt, seeded)
    # A stop id ends the stream before that token is emitted.
    stopped = generate(model, prompt, SamplingParams.greedy(12, stop_ids=[greedy[3]]))
    assert stopped == greedy[:greedy.index(greedy[3])]
    # Repetition penalty divides positive logits of seen tokens.
    logits = torch.tensor([2.0, -1.0, 3.0])
    out = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0),
                         torch.tensor([0]), torch.tensor([1], dtype=torch.long))
    assert out.tolist() == [1.0, -2.0, 3.0]
    # top_p keeps the smallest prefix of the sorted distribution covering p.
    out = process_logits(torch.log(torch.tensor([0.5, 0.3, 0.2])), SamplingParams(temperature=1.0, top_p=0.7),
                         torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert torch.isinf(out).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="prompt"):
        list(stream_generate(model, [], SamplingParams.greedy(3)))


def _one_row_rules(row, p: SamplingParams, seen, generated):
    """The sampling rules written plainly for one row (V,), with a full sort: what process_rows must equal."""
    row = row.float().clone()
    if p.repetition_penalty != 1.0:
        row[seen] = torch.where(row[seen] > 0, row[seen] / p.repetition_penalty, row[seen] * p.repetition_penalty)
    row[generated] -= p.presence_penalty
    if p.temperature <= 0:
        return row
    row = row / p.temperature
    if 0 < p.top_k < row.numel():
        row = row.masked_fill(row < row.topk(p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        ranked, order = row.sort(descending=True)
        probs = ranked.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p
        row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return row


def test_batched_sampling_rules_equal_the_one_row_rules_and_sample_the_right_distribution():
    """One batched pass over rows with different settings equals the plain one-row rules; the inverse-CDF
    draw follows the processed distribution; a seeded row ignores its batch-mates."""
    torch.manual_seed(0)
    V = 300
    logits = torch.randn(7, V) * 3
    logits[0] /= 10    # a flat row: its nucleus reaches past the topk head (the full-sort path)
    logits[5:] *= 4    # peaked rows: their nucleus fits the head (the fast path)
    params = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams.greedy(),
              SamplingParams(temperature=1.3, top_k=7, top_p=1.0, repetition_penalty=1.2, presence_penalty=0.4),
              SamplingParams(temperature=1.0, top_k=0, top_p=1.0),
              SamplingParams(temperature=0.0, top_p=0.5, repetition_penalty=2.0),
              SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=1.1, top_k=20, top_p=0.7)]
    prompts = [torch.randint(0, V, (n,)) for n in (4, 0, 9, 3, 6, 2, 5)]
    outputs = [torch.randint(0, V, (n,)) for n in (0, 2, 5, 1, 3, 4, 0)]
    generated = torch.stack([token_mask(V, o) for o in outputs])
    seen = generated | torch.stack([token_mask(V, p) for p in prompts])
    batched = process_rows(logits, params, seen, generated)
    for i, p in enumerate(params):
        want = _one_row_rules(logits[i], p, seen[i], generated[i])
        assert torch.equal(torch.isinf(batched[i]), torch.isinf(want)), i
        assert torch.allclose(batched[i][~torch.isinf(want)], want[~torch.isinf(want)], rtol=0, atol=1e-6), i
        assert torch.equal(batched[i], process_logits(logits[i], p, prompts[i], outputs[i]))
    kept = (~torch.isinf(batched)).sum(-1).tolist()
    assert kept[2] == 7 and kept[3] == V and kept[5] < 64 < kept[0]   # top-k; rules off; head vs spill
    # Frequencies of 20,000 draws against the processed probabilities (row 0: top-p 0.9 at temperature 0.7).
    probs = batched[0].softmax(-1)
    draws = torch.tensor([sample_rows(batched[:1], params[:1], [None])[0] for _ in range(20_000)])
    freq = torch.bincount(draws, minlength=V) / len(draws)
    assert (freq[probs == 0] == 0).all()                    # nothing outside the nucleus is ever drawn
    assert (freq - probs).abs().max() < 4 * (probs.max() / len(draws)) ** 0.5 + 1e-3
    # Greedy rows are the argmax whatever the others do; a seeded row draws the same token alone or batched.
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=5)
    alone = sample_rows(batched[2:3], [seeded], [make_generator(seeded, "cpu")])
    mixed = sample_rows(batched[1:3], [params[1], seeded], [None, make_generator(seeded, "cpu")])
    assert mixed == [int(batched[1].argmax()), alone[0]]


def _reference_moe(moe, x):
    """Token-by-token MoE: the slow definition the vectorised dispatch must equal."""
    B, T, C = x.shape
    flat = x.reshape(-1, C)
    scores = F.linear(flat, moe.gate.weight).softmax(-1)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        w, idx = scores[n].topk(moe.gate.top_k)
        w = w / w.sum()
        for weight, e in zip(w, idx):
            out[n] += weight * moe.experts[int(e)](flat[n:n + 1])[0]
        for shared in moe.shared_experts:
            out[n] += shared(flat[n:n + 1])[0]
    return out.view(B, T, C)


def test_moe_dispatch_matches_per_token_reference():
    torch.manual_seed(5)
    model = MiniMind(PRESETS["tiny-moe"]).eval()
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        fast, aux = moe(x)
        assert torch.allclose(fast, _reference_moe(moe, x), atol=1e-5)
    assert float(aux) == 0.0  # the balancing loss is a training-time term


def test_moe_aux_loss_penalises_imbalance():
    torch.manual_seed(6)
    moe = MiniMind(PRESETS["tiny-moe"]).model.layers[0].mlp.train()
    x = torch.randn(4, 32, 64)
    with torch.no_grad():
        moe.gate.weight.zero_()
        _, uniform = moe(x)  # uniform router: loss equals alpha exactly
        moe.gate.weight[0] = 5 * x.reshape(-1, 64).mean(0)  # drive every token to expert 0
        _, skewed = moe(x)
    assert math.isclose(float(uniform), PRESETS["tiny-moe"].aux_loss_alpha, rel_tol=1e-5)
    assert float(skewed) > float(uniform)
    # And it trains: gradients reach the router through the aux loss.
    moe.gate.weight.grad = None
    _, aux = moe(x)
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_lm_loss_masks_and_weights():
    torch.manual_seed(7)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)
    ce = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none").view(2, 5)
    assert torch.allclose(lm_loss(logits, targets, mask), (ce * mask).sum() / mask.sum())
    weights = mask.clone()
    weights[0, 1] = 10.0
    assert torch.allclose(lm_loss(logits, targets, weights), (ce * weights).sum() / weights.sum())


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    lp = torch.tensor([-1.5, -2.0, -0.3])
    loss, metrics = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    assert float(metrics["reward_margin"]) == 0.0
    better, _ = dpo_loss(lp + 1, lp - 1, lp, lp - 1, beta=0.1)
    assert float(better) < math.log(2)


def test_sequence_logprob_is_length_averaged():
    logits = torch.zeros(1, 4, 8)  # uniform: every token has log-prob -ln 8
    mask = torch.tensor([[0, 1, 1, 0]])
    assert torch.allclose(sequence_logprob(logits, torch.zeros(1, 4, dtype=torch.long), mask),
                          torch.tensor([-math.log(8)]))


def test_distill_loss_kl_vanishes_for_identical_models():
    torch.manual_seed(8)
    logits = torch.randn(2, 6, 50)
    targets = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6)
    loss, m = distill_loss(logits, logits.clone(), targets, mask, alpha=0.0, temperature=2.0)
    assert abs(float(loss)) < 1e-6 and abs(float(m["kl"])) < 1e-6
    other, m2 = distill_loss(logits, torch.randn(2, 6, 50), targets, mask, alpha=0.0, temperature=2.0)
    assert float(m2["kl"]) > 0.01
    hard, _ = distill_loss(logits, torch.randn(2, 6, 50), targets, mask, alpha=1.0)
    assert torch.allclose(hard, lm_loss(logits, targets, mask))


def test_lora_trains_adapters_only_and_merges():
    torch.manual_seed(9)
    model = MiniMind(PRESETS["tiny"])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert len(wrapped) == 4 * PRESETS["tiny"].num_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 6400, (2, 12))
    for _ in range(3):
        logits = model(x[:, :-1]).logits
        loss = lm_loss(logits, x[:, 1:], torch.ones(2, 11))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Base weights are bit-identical; adapters moved.
    for name, value in model.state_dict().items():
        plain = name.replace(".base.", ".")
        if plain in base:
            assert torch.equal(value, base[plain]), name
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(model).items() if k.endswith("lora_B"))
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
        merged = merge_lora(model)(x).logits
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert set(merged_keys := model.state_dict()) == set(base) and merged_keys
