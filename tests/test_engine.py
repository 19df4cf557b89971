"""The continuous-batching engine (serve/engine.py) and the OpenAI protocol layer, without Ray.

Exact equality between batched and one-at-a-time greedy decoding: a batched fp32 matmul may round differently
from a single-row one, and on a random tiny model two logits can be close enough for that last bit to flip an
argmax. These tests run the engine in float64, where such a flip needs two logits within ~1e-15 of each other,
and compare against the engine's own batch-1 path and against `minimind.generate` (cache and recompute).
"""
import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minimind.checkpoint import load_checkpoint, save_checkpoint
from minimind.config import PRESETS
from minimind.generate import SamplingParams, generate
from minimind.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, lora_state_dict
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer
from serve.engine import EngineBusy, EngineConfig, EngineUnavailable, load_engine
from serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ThinkSplitter, parse_request

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, project_tokenizer):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(MiniMind(PRESETS["tiny"]), out, tokenizer=Tokenizer.from_dir(project_tokenizer))
    return out


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    eng = load_engine(tiny_ckpt, EngineConfig(max_batch=4, max_len=256), dtype="float64")
    yield eng
    eng.shutdown()


def prompts(engine, n):
    tok = engine.tokenizer
    texts = ["你好", "介绍一下你自己", "What is 2 + 2?", "写一首关于春天的诗", "Ray Serve", "长" * 30, "x", "今天天气"]
    return [tok.apply_chat_template([{"role": "user", "content": texts[i % len(texts)] * (1 + i // len(texts))}],
                                    tokenize=True) for i in range(n)]


@pytest.mark.timeout(60)
def test_engine_matches_reference_generate(engine):
    for prompt in prompts(engine, 3):
        want = generate(engine.model, prompt, SamplingParams.greedy(20))  # stops at nothing: no stop ids
        assert engine.generate(prompt, SamplingParams.greedy(20), ignore_eos=True).token_ids == want
        assert generate(engine.model, prompt, SamplingParams.greedy(20), use_cache=False) == want


@pytest.mark.timeout(60)
def test_concurrent_greedy_equals_sequential(engine):
    # 7 requests on 4 slots with different lengths: requests queue, join a running batch and leave it early.
    ps = prompts(engine, 7)
    lengths = [5, 30, 12, 40, 8, 25, 17]
    alone = [engine.generate(p, SamplingParams.greedy(n), ignore_eos=True) for p, n in zip(ps, lengths)]
    before = dict(engine.snapshot()["batch_sizes"])

    async def together():
        async def one(p, n):
            return [d async for d in engine.stream(p, SamplingParams.greedy(n), ignore_eos=True)]
        return await asyncio.gather(*(one(p, n) for p, n in zip(ps, lengths)))

    for seq, deltas in zip(alone, asyncio.run(together())):
        assert [t for d in deltas for t in d.token_ids] == seq.token_ids
        assert "".join(d.text for d in deltas) == seq.text
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == len(seq.token_ids)
    after = engine.snapshot()["batch_sizes"]
    batched = {size: after[size] - before.get(size, 0) for size in after if size > 1}
    assert batched.get(4, 0) > 0, f"requests never shared a forward pass: {after}"


def submit_together(eng, items, events):
    """Submit every (name, prompt, max_tokens) while holding the scheduler's lock, so that all arrive in one
    admission; each Delta is recorded in `events` as (name, delta), in the order the scheduler emits them."""
    with eng._cv:  # a re-entrant lock: submit() takes it again from this thread
        return [eng.submit(prompt, SamplingParams.greedy(n), lambda d, name=name: events.append((name, d)),
                           ignore_eos=True) for name, prompt, n in items]


def wait_finished(reqs, timeout=30):
    deadline = time.monotonic() + timeout
    while not all(r.finished for r in reqs):
        assert time.monotonic() < deadline, "requests did not finish"
        time.sleep(0.01)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("budget", [16, 4096], ids=["chunked", "batched"])
def test_batched_and_chunked_prefill_equal_one_at_a_time(tiny_ckpt, engine, budget):
    """Seven prompts of 6 to 40 tokens admitted together: prefilled as ragged batches (budget 4096: in one
    forward) or in chunks of at most 16 positions; every greedy output equals the request decoded alone."""
    ps = prompts(engine, 7)
    alone = [engine.generate(p, SamplingParams.greedy(8), ignore_eos=True).token_ids for p in ps]
    eng = load_engine(tiny_ckpt, EngineConfig(max_batch=8, max_len=256, prefill_tokens=budget), dtype="float64")
    try:
        events = []
        reqs = submit_together(eng, [(i, p, 8) for i, p in enumerate(ps)], events)
        wait_finished(reqs)
        for i, want in enumerate(alone):
            assert [t for name, d in events if name == i for t in d.token_ids] == want
        snap = eng.snapshot()
    finally:
        eng.shutdown()
    assert snap["prefills"] == 7
    if budget == 16:
        # At most 16 positions a forward, so the 7 prompts (one of them longer than 16) took several each.
        assert sum(map(len, ps)) <= snap["prefill_positions"] <= 16 * snap["prefill_forwards"]
        assert max(map(len, ps)) > 16
    else:
        assert snap["prefill_forwards"] == 1 and snap["prefill_positions"] == 7 * max(len(p) for p in ps)


@pytest.mark.timeout(60)
def test_a_long_prompt_does_not_stall_running_decodes(tiny_ckpt):
    """A 200-token prompt arriving beside a short one is prefilled 16 positions per iteration while the short
    request decodes: the short one gets a token from every iteration the long prompt's chunks take."""
    eng = load_engine(tiny_ckpt, EngineConfig(max_batch=2, max_len=512, prefill_tokens=16), dtype="float64")
    try:
        short_prompt, long_prompt = prompts(eng, 1)[0], [5 + i % 500 for i in range(200)]
        seen, long_ids = {}, []

        def on_long(delta):  # runs on the scheduler thread: the short request's progress at this instant
            seen.setdefault("short_tokens", len(reqs[0].output))
            long_ids.extend(delta.token_ids)

        with eng._cv:  # both arrive in one admission (a re-entrant lock: submit() takes it again)
            reqs = [eng.submit(short_prompt, SamplingParams.greedy(60), lambda d: None, ignore_eos=True),
                    eng.submit(long_prompt, SamplingParams.greedy(2), on_long, ignore_eos=True)]
        wait_finished(reqs)
        alone = eng.generate(long_prompt, SamplingParams.greedy(2), ignore_eos=True).token_ids
    finally:
        eng.shutdown()
    assert seen["short_tokens"] >= 200 // 16  # at least one decode step per chunk of the long prompt
    assert long_ids == alone


@pytest.mark.timeout(60)
def test_prefix_cache_reuses_a_shared_system_prompt(tiny_ckpt, engine, tmp_path, random_adapter):
    """Chats sharing a long system prompt: the later ones copy its K/V (whole 16-token blocks) instead of
    prefilling it, and decode exactly what an engine without prefix caching decodes. Keys depend on every
    token before a block and on the adapter; an evicted block is simply recomputed."""
    tok = engine.tokenizer
    system = "你是一个乐于助人的诗人，回答时用简短的句子，并且总是礼貌地回应每一个问题。" * 3
    questions = ["你好", "写一首关于春天的诗", "What is 2 + 2?"]
    chats = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                     tokenize=True) for q in questions]
    shared = next(i for i, ids in enumerate(zip(*chats)) if len(set(ids)) > 1)  # tokens all three share
    assert shared > 64
    plain = load_engine(tiny_ckpt, EngineConfig(max_batch=2, max_len=256, prefix_cache_tokens=0), dtype="float64")
    cached = load_engine(tiny_ckpt, EngineConfig(max_batch=2, max_len=256), dtype="float64")
    small = load_engine(tiny_ckpt, EngineConfig(max_batch=2, max_len=256, prefix_cache_tokens=32),
                        dtype="float64")
    try:
        assert plain.snapshot()["prefix_cache"] is None
        want = [plain.generate(c, SamplingParams.greedy(12), ignore_eos=True).token_ids for c in chats]
        got, hits = [], []
        for c in chats:
            got.append(cached.generate(c, SamplingParams.greedy(12), ignore_eos=True).token_ids)
            hits.append(cached.snapshot()["prefix_cache"]["hit_tokens"])
        assert got == want
        # The first chat found nothing; each later one found the shared prefix's whole blocks.
        assert hits[0] == 0 and hits[1] == hits[2] - hits[1] == shared // 16 * 16
        # The same prompt again: everything but the last token's block comes from the cache.
        before = cached.snapshot()
        assert cached.generate(chats[0], SamplingParams.greedy(12), ignore_eos=True).token_ids == want[0]
        after = cached.snapshot()
        assert after["prefix_cache"]["hit_tokens"] - before["prefix_cache"]["hit_tokens"] == (len(chats[0]) - 1) // 16 * 16
        assert after["prefill_positions"] - before["prefill_positions"] == len(chats[0]) - (len(chats[0]) - 1) // 16 * 16
        # An adapter changes every K/V: its first request reuses none of the base model's blocks.
        adapter, _ = random_adapter(tiny_ckpt, tmp_path / "a", 1, 4, ("q_proj", "v_proj"), std=0.5)
        cached.generate(chats[0], SamplingParams.greedy(2), ignore_eos=True, adapter=str(adapter))
        assert cached.snapshot()["prefix_cache"]["hit_tokens"] == after["prefix_cache"]["hit_tokens"]
        # Room for two blocks: older ones are evicted, and the answers stay right.
        assert [small.generate(c, SamplingParams.greedy(12), ignore_eos=True).token_ids for c in chats] == want
        stats = small.snapshot()["prefix_cache"]
        assert stats["tokens"] == 32 and stats["evicted_blocks"] > 0
    finally:
        for eng in (plain, cached, small):
            eng.shutdown()


@pytest.mark.timeout(60)
def test_no_cache_mode_matches_cache(tiny_ckpt, engine):
    recompute = load_engine(tiny_ckpt, EngineConfig(max_batch=4, kv_cache=False), dtype="float64")
    try:
        for prompt in prompts(engine, 3):
            a = engine.generate(prompt, SamplingParams.greedy(12), ignore_eos=True)
            b = recompute.generate(prompt, SamplingParams.greedy(12), ignore_eos=True)
            assert a.token_ids == b.token_ids
    finally:
        recompute.shutdown()


@pytest.mark.timeout(60)
def test_stop_strings_stop_ids_and_lengths(engine):
    prompt = prompts(engine, 1)[0]
    full = engine.generate(prompt, SamplingParams.greedy(30), ignore_eos=True)
    assert full.finish_reason == "length" and full.completion_tokens == 30
    # A stop string from the middle of the text: the output ends right before it, and no streamed piece leaks it.
    stop = full.text[len(full.text) // 2:][:3]
    cut = full.text.index(stop)
    before = engine.snapshot()
    deltas = list(engine.stream_sync(prompt, SamplingParams.greedy(200), stop=[stop, "never-appears"],
                                     ignore_eos=True))
    assert "".join(d.text for d in deltas) == full.text[:cut]
    assert deltas[-1].finish_reason == "stop"
    # The front end found it and cancelled the core request: it did not decode on to max_tokens (200).
    deadline = time.monotonic() + 10
    while (after := engine.snapshot())["active"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert after["finish_reasons"]["stop"] == before["finish_reasons"].get("stop", 0) + 1
    assert deltas[-1].completion_tokens < 30 and after["decoded_tokens"] - before["decoded_tokens"] < 200
    # A stop id ends the output before that token; it is not returned.
    params = SamplingParams.greedy(30, stop_ids=[full.token_ids[5]])
    out = engine.generate(prompt, params, ignore_eos=True)
    first = full.token_ids.index(full.token_ids[5])
    assert out.token_ids == full.token_ids[:first] and out.finish_reason == "stop"
    # The context limit is checked before anything runs.
    with pytest.raises(ValueError, match="maximum context length"):
        engine.generate(prompt, SamplingParams.greedy(engine.context_len))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], SamplingParams.greedy(3))


@pytest.mark.timeout(60)
def test_the_engine_core_needs_no_tokenizer(engine):
    """The core schedules and samples token ids only: built without a tokenizer, it emits the same greedy ids
    as the in-process front end, as TokenDeltas of one id each, the last one finished."""
    from serve.engine import Engine
    core = Engine(engine.model, tokenizer=None, config=EngineConfig(max_batch=2, max_len=256), eos_ids=[])
    try:
        prompt = prompts(engine, 1)[0]
        got, done = [], threading.Event()

        def emit(delta):
            got.append(delta)
            if delta.finish_reason is not None:
                done.set()
        core.submit(prompt, SamplingParams.greedy(10), emit)
        assert done.wait(30)
    finally:
        core.shutdown()
    assert all(len(d.token_ids) == 1 and not hasattr(d, "text") for d in got)
    assert [t for d in got for t in d.token_ids] == engine.generate(prompt, SamplingParams.greedy(10),
                                                                   ignore_eos=True).token_ids
    assert got[-1].finish_reason == "length" and got[-1].completion_tokens == 10


@pytest.mark.timeout(60)
def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    ps = prompts(engine, 4)
    sampled = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1,
                             presence_penalty=0.5, seed=7)
    alone = engine.generate(ps[0], sampled, ignore_eos=True).token_ids

    async def with_others():
        async def one(p, params):
            return [t async for d in engine.stream(p, params, ignore_eos=True) for t in d.token_ids]
        others = [one(p, SamplingParams.greedy(15)) for p in ps[1:]]
        return (await asyncio.gather(one(ps[0], sampled), *others))[0]

    assert asyncio.run(with_others()) == alone
    other_seed = dataclasses.replace(sampled, seed=8)
    assert engine.generate(ps[0], other_seed, ignore_eos=True).token_ids != alone


@pytest.mark.timeout(60)
def test_cancelled_request_frees_its_slot(tiny_ckpt):
    eng = load_engine(tiny_ckpt, EngineConfig(max_batch=1, max_len=512, max_waiting=1))
    try:
        prompt = prompts(eng, 1)[0]
        stream = eng.stream_sync(prompt, SamplingParams.greedy(400), ignore_eos=True)
        next(stream)
        stream.close()  # the consumer walks away after one piece
        out = eng.generate(prompt, SamplingParams.greedy(3), ignore_eos=True, timeout=30)
        assert out.completion_tokens == 3
        assert eng.snapshot()["active"] == 0
        # A full waiting queue refuses new work instead of growing without bound. Holding the engine's lock
        # keeps the scheduler from admitting the first request while the second one is submitted.
        with eng._cv:
            eng.submit(prompt, SamplingParams.greedy(2), lambda d: None)
            with pytest.raises(EngineBusy):
                eng.submit(prompt, SamplingParams.greedy(2), lambda d: None)
    finally:
        eng.shutdown()
    assert not eng.alive


@pytest.mark.timeout(90)
def test_adapters_per_request_share_a_batch_and_equal_their_merged_models(tiny_ckpt, engine, tmp_path,
                                                                          random_adapter):
    """Two adapters of different ranks and targets and the base, two requests each, decoded in the same
    batches: each greedy output equals its merged model's. A bad adapter fails at submission."""
    a_dir, a_model = random_adapter(tiny_ckpt, tmp_path / "a", 1, 4, ("q_proj", "v_proj"), std=0.5)
    b_dir, b_model = random_adapter(tiny_ckpt, tmp_path / "b", 2, 8, ("q_proj", "k_proj", "v_proj", "o_proj"), std=0.5)
    eng = load_engine(tiny_ckpt, EngineConfig(max_batch=6, max_len=256), dtype="float64")
    try:
        ps = prompts(eng, 6)
        adapters = [None, a_dir, b_dir, a_dir, None, b_dir]
        wants = [generate({None: engine.model, a_dir: a_model, b_dir: b_model}[ad], p, SamplingParams.greedy(10))
                 for p, ad in zip(ps, adapters)]
        base = [generate(engine.model, p, SamplingParams.greedy(10)) for p in ps]
        for ad in (a_dir, b_dir):  # each adapter changes the answer (else this test could not tell them apart)
            assert any(w != b for w, b, x in zip(wants, base, adapters) if x == ad)
        events = []
        with eng._cv:  # one admission: all six share the first decode step
            reqs = [eng.submit(p, SamplingParams.greedy(10), lambda d, i=i: events.append((i, d)), ignore_eos=True,
                               adapter=None if ad is None else str(ad)) for i, (p, ad) in enumerate(zip(ps, adapters))]
        wait_finished(reqs)
        for i, want in enumerate(wants):
            assert [t for j, d in events if j == i for t in d.token_ids] == want, f"request {i}"
        snap = eng.snapshot()
        assert snap["adapters"] == 2 and snap["batch_sizes"].get(6, 0) > 0
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / ADAPTER_CONFIG).write_text(json.dumps({"rank": 4, "alpha": 8.0}))
        with pytest.raises(FileNotFoundError, match="needs adapter_config.json and adapter_model.safetensors"):
            eng.submit(ps[0], SamplingParams.greedy(2), lambda d: None, adapter=str(tmp_path / "bad"))
        with pytest.raises(FileNotFoundError):
            eng.submit(ps[0], SamplingParams.greedy(2), lambda d: None, adapter=str(tmp_path / "missing"))
        assert eng.generate(ps[0], SamplingParams.greedy(10), ignore_eos=True).token_ids == wants[0]
    finally:
        eng.shutdown()


@pytest.mark.timeout(60)
def test_lora_adapter_is_merged_at_load(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    from minimind.checkpoint import load_model

    model = load_model(tiny_ckpt)
    apply_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    save_file(lora_state_dict(model), str(tmp_path / ADAPTER_WEIGHTS))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"rank": 4, "alpha": 8.0}))
    eng = load_engine(tiny_ckpt, EngineConfig(max_batch=1, max_len=128), lora=str(tmp_path), dtype="float64")
    try:
        prompt = prompts(eng, 1)[0]
        with torch.no_grad():
            want = model.double()(torch.tensor([prompt])).logits[0, -1].argmax().item()
        assert eng.generate(prompt, SamplingParams.greedy(1), ignore_eos=True).token_ids == [want]
    finally:
        eng.shutdown()


@pytest.mark.parametrize("mode,text,want", [
    ("auto", "<think>\nweigh it\n</think>\n\nThe answer.", ("\nweigh it\n", "The answer.")),
    ("auto", "  <think>a</think>b", ("a", "b")),
    ("auto", "no tags <think>x</think>", ("", "no tags <think>x</think>")),
    ("auto", "<thin", ("", "<thin")),
    ("on", "thinking...</think>answer", ("thinking...", "answer")),
    ("on", "<think>t</think>a", ("t", "a")),
    ("on", "never closed", ("never closed", "")),
    ("off", "<think>t</think>a", ("", "<think>t</think>a")),
    # MiniMind's reasoning template: the reply comes wrapped in <answer>, which is not part of the content.
    ("auto", "<think>\nr\n</think>\n<answer>\nThe reply.\n</answer>", ("\nr\n", "The reply.")),
    ("auto", "<answer>x</answer>", ("", "x")),
    ("on", "r</think><answer>x\ny</answer>\nafter", ("r", "x\ny\nafter")),
    ("auto", "<think>r</think>\n<answer>\nunclosed\n", ("r", "unclosed\n")),
    ("auto", "<ans", ("", "<ans")),
    ("auto", "a </answer> b", ("", "a </answer> b")),
    ("off", "<answer>x</answer>", ("", "<answer>x</answer>")),
])
def test_think_splitter_streams_any_split(mode, text, want):
    for size in (1, 2, 3, len(text)):  # tags cut at every position across pieces
        splitter = ThinkSplitter(mode)
        parts = [splitter.push(text[i:i + size]) for i in range(0, len(text), size)] + [splitter.flush()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == want


@pytest.mark.parametrize("body,param", [
    (b'{"model": "m", "messages": [', None),
    (b'[1, 2]', None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "m"}', "messages"),
    (b'{"model": "m", "messages": []}', "messages"),
    (b'{"model": "m", "messages": "hi"}', "messages"),
    (b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}', "messages.0.role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}', "n"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', "stop"),
    # torch.Generator takes [-2**63, 2**64): anything else must be a 400 here, not a 500 from the engine
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1180591620717411303424}', "seed"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}', "seed"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": -9223372036854775809}', "seed"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', "tools"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}', "tool_choice"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "function_call": "auto2"}', "function_call"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}',
     "response_format"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 0}', "top_logprobs"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true}', "logprobs"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}', "logit_bias"),
])
def test_bad_chat_requests_name_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_request(ChatCompletionRequest, body)
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_good_requests_parse_with_defaults_from_the_checkpoint():
    req = parse_request(ChatCompletionRequest, json.dumps({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 9, "stop": "\n", "seed": 3, "top_k": 5, "user": "ignored"}).encode())
    params = req.sampling_params(100, {"temperature": 0.85, "top_p": 0.85})
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (9, .85, .85, 5, 3)
    assert req.messages[0].text() == "hi" and req.stop_strings() == ["\n"]
    req = parse_request(CompletionRequest, b'{"model": "m", "prompt": [1, 2, 3], "temperature": 0}')
    assert req.sampling_params(7, {}).max_new_tokens == 7 and req.sampling_params(7, {}).temperature == 0


def test_shipped_serve_config_builds(tiny_ckpt):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import ServeConfig, parse_args

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "serve.app:app" and config.http_options.host == "127.0.0.1"
    cfg = parse_args({**application.args, "model": str(tiny_ckpt)})
    assert isinstance(cfg, ServeConfig) and cfg.name == "tiny"
    with pytest.raises(ValueError, match="unknown application arguments"):
        parse_args({"model": str(tiny_ckpt), "max_batchh": 4})
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        parse_args({"model": "/nonexistent"})


@pytest.mark.timeout(120)
def test_terminal_chat(tiny_ckpt):
    proc = subprocess.run([sys.executable, "serve/chat.py", "--model", str(tiny_ckpt), "--max-tokens", "5",
                           "--temperature", "0"], input="你好\n/reset\n再见\n/exit\n", capture_output=True,
                          text=True, cwd=REPO, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("minimind> ") == 2


@pytest.mark.timeout(120)
def test_engine_process_streams_cancels_and_reports_its_death(tiny_ckpt, engine):
    from serve.engine_process import EngineProcess

    proc = EngineProcess(tiny_ckpt, EngineConfig(max_batch=2, max_len=256), dtype="float64")
    prompt = prompts(engine, 1)[0]
    want = engine.generate(prompt, SamplingParams.greedy(12), ignore_eos=True)

    async def scenario():
        got = [d async for d in proc.stream(prompt, SamplingParams.greedy(12), ignore_eos=True)]
        assert [t for d in got for t in d.token_ids] == want.token_ids and got[-1].finish_reason == "length"
        proc.stream_interval = 0.2  # chunks at most every 200 ms: the same tokens in far fewer pieces
        got = [d async for d in proc.stream(prompt, SamplingParams.greedy(12), ignore_eos=True)]
        assert [t for d in got for t in d.token_ids] == want.token_ids and len(got) < 6
        proc.stream_interval = 0.0
        long = proc.stream(prompt, SamplingParams.greedy(200), ignore_eos=True)
        await long.__anext__()
        await long.aclose()  # a client that hangs up: its slot must come back
        for _ in range(100):
            if (await proc.stats())["active"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await proc.stats())["active"] == 0
        with pytest.raises(ValueError, match="maximum context length"):
            proc.stream(prompt, SamplingParams.greedy(1000))
        proc._proc.kill()  # the engine dies: a new request is refused at once (stream() checks), never hangs
        proc._proc.wait(10)
        with pytest.raises(EngineUnavailable, match="exited with code -9"):
            proc.stream(prompt, SamplingParams.greedy(50), ignore_eos=True)
        # The kind of failure is the exception's type (the server answers 503 for it), with the reason.
        with pytest.raises(EngineUnavailable, match="exited with code -9"):
            await proc.stats()
        with pytest.raises(EngineUnavailable):
            proc.stream(prompt, SamplingParams.greedy(5))

    try:
        asyncio.run(scenario())
        for _ in range(100):
            if not proc.alive:
                break
            time.sleep(0.05)
        assert not proc.alive
    finally:
        proc.shutdown()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dtype, slack", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_the_served_dtypes_decode_greedily_in_that_dtype(tiny_ckpt, engine, dtype, slack):
    """What a replica runs (the engine process) in the shipped default float32 and in bfloat16, two requests
    batched: it holds the model in that dtype, and every streamed token is the greedy choice of that model
    given what came before. Batched and one-row matmuls may round differently (module docstring), so a token
    counts as greedy when its logit is within `slack` of the top one (bfloat16 keeps ~3 significant digits)."""
    from serve.engine_process import EngineProcess

    model = load_checkpoint(tiny_ckpt)[0].to(getattr(torch, dtype)).eval()
    two = prompts(engine, 2)
    proc = EngineProcess(tiny_ckpt, EngineConfig(max_batch=2, max_len=256), dtype=dtype)
    try:
        async def both():
            async def one(p):
                return [t async for d in proc.stream(p, SamplingParams.greedy(16), ignore_eos=True)
                        for t in d.token_ids]
            return await asyncio.gather(*(one(p) for p in two)), await proc.stats()
        got, stats = asyncio.run(both())
    finally:
        proc.shutdown()
    assert stats["dtype"] == dtype and stats["batch_sizes"].get(2, 0) > 0  # in that dtype, and batched
    for prompt, tokens in zip(two, got):
        assert len(tokens) == 16
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (logits.max(1).values - chosen).max().item() <= slack, (dtype, tokens)


def test_packed_linears_compute_the_plain_model(tiny_ckpt):
    """On the CPU in fp32 the engine's block linears run on oneDNN-packed weights (one row: x @ W^T on the
    transposed weight):
    every one is swapped, logits equal the plain model's to float rounding at 1 and at several rows, and
    greedy decoding is unchanged; packed_linears=False leaves plain nn.Linear."""
    from serve.engine import PackedLinear
    plain, _ = load_checkpoint(tiny_ckpt)
    plain.eval()
    engine = load_engine(tiny_ckpt, EngineConfig(max_batch=4, max_len=256))
    unpacked = load_engine(tiny_ckpt, EngineConfig(max_batch=4, max_len=256, packed_linears=False))
    try:
        layers = plain.config.num_layers
        assert sum(isinstance(m, PackedLinear) for m in engine.model.modules()) == layers * 7
        assert not any(isinstance(m, PackedLinear) for m in unpacked.model.modules())
        ids = torch.randint(3, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for x in (ids[:1, :1], ids[:1], ids):
                assert torch.allclose(engine.model(x).logits, plain(x).logits, rtol=0, atol=1e-5)
        prompt = ids[0].tolist()
        want = generate(plain, prompt, SamplingParams.greedy(24))
        assert engine.generate(prompt, SamplingParams.greedy(24), ignore_eos=True).token_ids[:len(want)] == want
    finally:
        engine.shutdown()
        unpacked.shutdown()
