"""The evaluate stage: its loss equals transformers' on the same checkpoint and documents (short and
strided-window long ones), Ray and in-process runs agree bit for bit, chat scores the assistant only, DPO
accuracy on a constructed case, the reasoning-format check, and bad lines named by file and line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.evaluate import EvalConfig, evaluate
from minimind.checkpoint import load_model, save_checkpoint
from minimind.config import get_preset
from minimind.formats import chat_tokens, record_conversation, record_dpo
from minimind.losses import dpo_loss, lm_loss, sequence_logprob
from minimind.model import MiniMind
from minimind.scoring import well_formed, windows

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "minimind" / "data"


def _lines(name: str, n: int) -> list[str]:
    return (DATA / name).read_text(encoding="utf-8").splitlines()[:n]


def _write(path: Path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    from minimind.__main__ import default_tokenizer
    return default_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    torch.manual_seed(0)
    return str(save_checkpoint(MiniMind(get_preset("tiny")), tmp_path_factory.mktemp("ev") / "tiny", tokenizer=tok))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("ev") / "corpus.jsonl", _lines("sample_corpus.jsonl", 24))


def _eval(**kw):
    kw.setdefault("ray", False)
    return evaluate(EvalConfig(**kw))


def test_windows_predict_every_target_once():
    for n in (2, 3, 10, 33, 34, 100, 257):
        for w in (1, 2, 5, 32):
            seen = []
            for begin, end, first in windows(n, w):
                assert end - begin <= w and begin < first <= end  # context begins before the scored targets
                seen.extend(range(first, end + 1))
            assert seen == list(range(1, n))


def _hf_strided_nats(hf, ids: list[int], max_length: int, stride: int) -> float:
    """Hugging Face's sliding-window recipe ("Perplexity of fixed-length models"), summed in float64."""
    seq = torch.tensor([ids])
    nats, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end  # the targets this window adds
        window = seq[:, begin:end]
        with torch.no_grad():
            logp = torch.log_softmax(hf(window).logits.double(), -1)[0, :-1]  # predicts window[1:]
        picked = logp.gather(1, window[0, 1:, None])[:, 0]
        nats -= picked[-min(trg_len, len(picked)):].sum().item()
        prev_end = end
        if end == len(ids):
            break
    return nats


def test_loss_equals_transformers_short_and_long_documents(ckpt, corpus):
    import transformers
    window = 32
    report = _eval(model=ckpt, data=(corpus,), max_seq_len=window)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    sep = hf_tok.convert_tokens_to_ids("<|endoftext|>")
    texts = [json.loads(line)["text"] for line in Path(corpus).read_text(encoding="utf-8").splitlines()]
    assert [d["line"] for d in report.documents] == list(range(1, len(texts) + 1))
    lengths, total, all_chars = [], 0.0, 0
    for doc, text in zip(report.documents, texts):
        ids = [sep, *hf_tok(text, add_special_tokens=False)["input_ids"], sep]  # packed training's boundaries
        lengths.append(len(ids))
        expected = _hf_strided_nats(hf, ids, window + 1, window // 2)
        chars = len(text) - sum(text.count(t) * len(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
        assert doc["tokens"] == len(ids) - 1 and doc["chars"] == chars  # special tokens cover no text
        assert doc["nats"] == pytest.approx(expected, rel=1e-5)
        total, all_chars = total + expected, all_chars + chars
    assert min(lengths) <= window + 1 < 2 * window + 1 < max(lengths)  # one window, and three or more
    summary = report.summary
    assert summary["loss"] == pytest.approx(total / sum(n - 1 for n in lengths), rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]))
    assert summary["bits_per_char"] == pytest.approx(total / math.log(2) / all_chars, rel=1e-5)


def test_ray_and_in_process_give_identical_numbers(ray_cluster, ckpt, corpus, tmp_path):
    reason = _write(tmp_path / "reason.jsonl", _lines("sample_reason.jsonl", 6))
    runs = {}
    for ray in (False, True):
        a = _eval(model=ckpt, data=(corpus,), max_seq_len=32, ray=ray, workers=2, batch_size=4)
        b = _eval(model=ckpt, data=(reason,), format="reason", generate=3, max_new_tokens=6, samples=3, ray=ray,
                  workers=2, batch_size=2)
        runs[ray] = [(r.documents, {k: v for k, v in r.summary.items() if k not in ("ray", "seconds")})
                     for r in (a, b)]
    assert runs[True] == runs[False]  # exact equality: every float, every sample
    assert runs[True][1][1]["generated"] == 3


def test_chat_loss_is_assistant_only(ckpt, tok, tmp_path):
    lines = _lines("sample_sft.jsonl", 8)
    report = _eval(model=ckpt, data=(_write(tmp_path / "sft.jsonl", lines),), format="chat")
    model = load_model(ckpt, dtype=torch.float32).eval()
    nats = tokens = 0.0
    for doc, line in zip(report.documents, lines):
        ids, weights = chat_tokens(tok, record_conversation(json.loads(line)))
        x = torch.tensor(ids[None], dtype=torch.long)
        with torch.no_grad():
            logits = model(x[:, :-1]).logits
        w = torch.from_numpy(weights[None, 1:])
        manual = lm_loss(logits, x[:, 1:], w, reduction="sum").item()
        assert 0 < w.sum() < len(ids) - 1  # the mask leaves out the system/user turns
        assert doc["nats"] == pytest.approx(manual, rel=1e-5)
        assert doc["tokens"] == w.sum().item() and doc["all_tokens"] == len(ids) - 1
        nats, tokens = nats + manual, tokens + w.sum().item()
    summary = report.summary
    assert summary["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert abs(summary["loss"] - summary["loss_all_tokens"]) > 1e-3


def test_dpo_preference_accuracy_on_constructed_pairs(ckpt, tok, tmp_path):
    lines = _lines("sample_dpo.jsonl", 6)
    pairs = [record_dpo(json.loads(line)) for line in lines]
    # The policy: the reference tuned for a few steps on the chosen replies, so it must prefer every one.
    policy = load_model(ckpt, dtype=torch.float32)
    optim = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    rows = [chat_tokens(tok, chosen) for chosen, _ in pairs]
    for _ in range(25):
        for ids, w in rows:
            x = torch.tensor(ids[None], dtype=torch.long)
            loss = lm_loss(policy(x[:, :-1]).logits, x[:, 1:], torch.from_numpy(w[None, 1:]))
            optim.zero_grad()
            loss.backward()
            optim.step()
    policy_dir = str(save_checkpoint(policy.eval(), tmp_path / "policy", tokenizer=tok))
    data = _write(tmp_path / "dpo.jsonl", lines)
    swapped = _write(tmp_path / "swapped.jsonl", [json.dumps({"chosen": json.loads(x)["rejected"],
                                                              "rejected": json.loads(x)["chosen"]}) for x in lines])
    good = _eval(model=policy_dir, reference=ckpt, data=(data,), format="dpo").summary
    bad = _eval(model=policy_dir, reference=ckpt, data=(swapped,), format="dpo").summary
    same = _eval(model=ckpt, reference=ckpt, data=(data,), format="dpo").summary
    assert good["pairs"] == 6 and good["preference_accuracy"] == 1.0 and good["margin"] > 0
    assert bad["preference_accuracy"] == 0.0 and bad["margin"] == pytest.approx(-good["margin"], rel=1e-12)
    assert same["margin"] == 0.0 and same["preference_accuracy"] == 0.0
    assert same["dpo_loss"] == pytest.approx(math.log(2))
    # The margin is training's: dpo_loss on MiniMind's length-averaged sequence log-probs.
    ref = load_model(ckpt, dtype=torch.float32).eval()
    logps = {}
    for name, model in (("policy", policy), ("ref", ref)):
        for side in (0, 1):
            values = []
            for pair in pairs:
                ids, w = chat_tokens(tok, pair[side])
                x = torch.tensor(ids[None], dtype=torch.long)
                with torch.no_grad():
                    values.append(sequence_logprob(model(x[:, :-1]).logits, x[:, 1:], torch.from_numpy(w[None, 1:])))
            logps[name, side] = torch.cat(values)
    _, metrics = dpo_loss(logps["policy", 0], logps["policy", 1], logps["ref", 0], logps["ref", 1], beta=0.1)
    assert good["margin"] == pytest.approx(metrics["reward_margin"].item(), rel=1e-4)


def test_reasoning_format_check():
    assert well_formed("<think>\nsteps\n</think>\n<answer>\n19\n</answer>")
    assert well_formed("  <think></think><answer>x</answer>\n")
    assert well_formed("<think>a\nb</think>   <answer>c</answer>")
    assert not well_formed("<think>a</think>")                                  # no answer
    assert not well_formed("<answer>x</answer><think>a</think>")               # wrong order
    assert not well_formed("So: <think>a</think><answer>x</answer>")           # text before
    assert not well_formed("<think>a</think><answer>x</answer> done")          # text after
    assert not well_formed("<think>a</think> b <answer>x</answer>")            # text between
    assert not well_formed("<think>a</think><answer>x</answer><answer>y</answer>")  # a second answer
    assert not well_formed("<think><think>a</think><answer>x</answer>")        # a tag inside
    assert not well_formed("")


def test_reason_generate_matches_greedy_generation(ckpt, tok, tmp_path):
    from minimind.generate import SamplingParams, generate
    lines = _lines("sample_reason.jsonl", 3)
    summary = _eval(model=ckpt, data=(_write(tmp_path / "r.jsonl", lines),), format="reason", generate=2,
                    max_new_tokens=8, samples=2).summary
    assert summary["generated"] == 2 and summary["well_formed"] == 0.0  # an untrained model: no format yet
    model = load_model(ckpt, dtype=torch.float32).eval()
    prompt = record_conversation(json.loads(lines[0]))[:1]
    out = generate(model, tok.encode_chat(prompt, add_generation_prompt=True),
                   SamplingParams.greedy(8, stop_ids=[tok.eos_id]))
    assert summary["samples"][0]["output"] == tok.decode(out)
    assert summary["samples"][0]["prompt"] == prompt[0]["content"]


def test_bad_lines_are_named_by_file_and_line(ckpt, tmp_path):
    good = _lines("sample_corpus.jsonl", 6)
    data = _write(tmp_path / "bad.jsonl", [good[0], good[1], '{"text": "unclosed', good[2], '{"txt": "x"}',
                                           "", good[3]])
    report = _eval(model=ckpt, data=(data,), reject_threshold=0.5).summary
    assert report["records"] == 4 and report["rejected"] == 2
    assert [(r["file"], r["line"]) for r in report["rejects"]] == [(data, 3), (data, 5)]
    assert "malformed JSON" in report["rejects"][0]["error"] and "'text'" in report["rejects"][1]["error"]
    with pytest.raises(ValueError, match=rf"2 of 6 records .*{data}:3: malformed JSON"):
        _eval(model=ckpt, data=(data,))
    # The command line: a user error exits 2 with one `error:` line; a good run writes the report.
    cli = [sys.executable, str(REPO / "stages" / "evaluate.py"), "--model", ckpt, "--no-ray"]
    failed = subprocess.run(cli + ["--data", data], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and f"error: 2 of 6 records" in failed.stderr and f"{data}:3" in failed.stderr
    out = tmp_path / "report.json"
    ok = subprocess.run(cli + ["--data", data, "--reject-threshold", "0.5", "--out", str(out)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(out.read_text())["records"] == 4 and "perplexity" in ok.stdout
    assert f"rejected {data}:5:" in ok.stderr
