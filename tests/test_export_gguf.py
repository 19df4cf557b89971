"""`python -m minimind export`: the GGUF file is checked by the real runtime, llama.cpp (through
llama-cpp-python), against our own model and tokenizer: token ids, logits, greedy continuations; the Ollama
Modelfile's TEMPLATE is rendered by a small Go-template renderer and compared with our chat template's text.

llama-cpp-python is optional here: without it these tests skip, except under CI (which installs it), where a
missing llama_cpp is a failure. No Ray.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minimind.checkpoint import GENERATION_CONFIG, load_checkpoint, save_checkpoint
from minimind.config import get_preset
from minimind.export import (GPT2_SPLIT_REGEX, check_dtype, export_gguf, export_ollama, modelfile_text,
                             ollama_template, permute_rope_rows)
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer, iter_jsonl_texts

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "minimind" / "data" / "sample_corpus.jsonl"
N_CTX = 512


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama_cpp is not importable but CI is set: CI installs llama-cpp-python==0.3.36")
        pytest.skip("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36")
    return llama_cpp


@pytest.fixture
def load_llama():
    """`load_llama(path, f32_cache=False)`: a llama_cpp.Llama, closed when the test ends (closing it at interpreter
    exit instead prints an ignored TypeError from llama-cpp-python's __del__)."""
    opened = []

    def load(path, f32_cache: bool = False):
        opened.append(_load_llama(path, f32_cache))
        return opened[-1]
    yield load
    for llm in opened:
        llm.close()


def _load_llama(path, f32_cache: bool = False):
    """llama.cpp on the exported file. Its KV cache is f16 unless f32_cache: keys and values rounded to f16
    move the trained tiny model's f32 logits by up to 5.9e-3 (measured), the f32 cache by 1.6e-5."""
    lc = llama_cpp()
    kv = {"type_k": lc.GGML_TYPE_F32, "type_v": lc.GGML_TYPE_F32} if f32_cache else {}
    return lc.Llama(model_path=str(path), logits_all=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1, verbose=False,
                    **kv)


# ------------------------------------------------------------------------------------------------ fixtures


def train_checkpoint(cfg, tok: Tokenizer, out: Path, steps: int = 200, seed: int = 0) -> Path:
    """200 AdamW steps of plain torch on the bundled corpus (batch 16 x 64 tokens): enough that greedy
    continuations are text-like ("They saw 4 ducks. One duck was swimming in the water and said "quack"..."),
    where 60 steps still loop on <|im_end|><|im_start|>. One thread: on two shared cores, torch's two threads
    spin against the other load (measured 0.78 s a step with two threads, 0.10 s with one, while a compiler ran on both)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg, tok, out, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(cfg, tok, out, steps, seed):
    torch.manual_seed(seed)
    ids = []
    for text in iter_jsonl_texts([CORPUS]):
        ids += tok.encode(text) + [tok.eos_id]
    data = torch.tensor(ids)
    model = MiniMind(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    seq, batch = 64, 16
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        out_ = model(x)
        loss = F.cross_entropy(out_.logits.flatten(0, 1), y.flatten()) + out_.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_checkpoint(model, out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def tok(project_tokenizer) -> Tokenizer:
    return Tokenizer.from_dir(project_tokenizer)


@pytest.fixture(scope="module")
def dense_ckpt(tok, tmp_path_factory) -> Path:
    return train_checkpoint(get_preset("tiny"), tok, tmp_path_factory.mktemp("export") / "tiny")


@pytest.fixture(scope="module")
def dense(dense_ckpt, tmp_path_factory):
    """(our model, {dtype: gguf path}) for the trained tiny checkpoint."""
    out = tmp_path_factory.mktemp("gguf")
    paths = {d: Path(export_gguf(dense_ckpt, out / f"tiny-{d}.gguf", d)["path"]) for d in ("f32", "f16", "q8_0")}
    model, _ = load_checkpoint(dense_ckpt)
    return model.eval(), paths


def our_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def our_greedy(model, ids, n) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(our_logits(model, ids)[-1].argmax()))
    return ids[-n:]


def llama_greedy(llm, ids, n) -> list[int]:
    """Token by token through llama.cpp's KV cache: argmax of the last logits, fed back."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


PROMPTS = ["At noon, Emma and Zoe went to the hill. Snow covered the ground.",
           "<|im_start|>草莓是什么颜色的？",
           "What does 27 + 62 equal?"]

TOKEN_TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",          # poetry
    "草莓通常是红色的。北京是中国的首都，人口超过两千万。",        # Chinese prose
    " 3333", "12345 678", "3.14159 and 2,718,281", "2024年10月1日",  # digits: GPT-2 keeps runs whole
    "At noon, Max and Ben went to the park. They saw 4 birds.",   # English
    "I'm sure they'll say \"tweet\" -- don't they've?",            # contractions, quotes
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",   # ChatML (specials only with parse_special)
    "a  b   c\t\td\n\ne \n  \n", "   leading", "trailing   ", "\n\n\n", " ", "line1\r\nline2",
    "emoji 🙂 and ümlauts ß", "<|endoftext|>x<|im_end|>",
]


# ------------------------------------------------------------------------------------------------ file contents


def test_gguf_metadata(dense, tok):
    _, paths = dense
    r = gguf.GGUFReader(str(paths["f32"]))
    fields = {k: r.fields[k].contents() for k in r.fields}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.pretokenizer"] == GPT2_SPLIT_REGEX
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["llama.rope.freq_base"] == 1e6
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 6400 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[:4] == [3, 3, 3, 1] and types[tok.vocab_size:] == [5] * (6400 - tok.vocab_size)
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied head: llama.cpp reuses it
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(paths["q8_0"])).tensors}
    assert kinds["token_embd.weight"] == kinds["blk.0.ffn_down.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(paths["f16"])).tensors}
    assert kinds["blk.1.attn_q.weight"] == "F16" and kinds["blk.1.ffn_norm.weight"] == "F32"


def test_permute_rope_rows_is_rotate_half_to_pairs():
    # One head of dim 8: rotate-half pairs (0,4),(1,5),(2,6),(3,7) become adjacent rows.
    w = torch.arange(16.0).reshape(16, 1)
    assert permute_rope_rows(w, 2)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


# ------------------------------------------------------------------------------------------------ llama.cpp


def test_token_ids_match_llama_cpp(dense, tok, load_llama):
    _, paths = dense
    llm = load_llama(paths["f32"])
    for text in TOKEN_TEXTS:
        raw = text.encode("utf-8")
        # parse_special=False is our encode_plain (specials are text); True is our encode (specials matched).
        assert llm.tokenize(raw, add_bos=False, special=False) == tok.encode_plain(text), text
        assert llm.tokenize(raw, add_bos=False, special=True) == tok.encode(text), text
        assert llm.detokenize(tok.encode_plain(text)) == raw, text
    # The digit trap: a pre-tokeniser that splits digits one by one (llama.cpp's "qwen2", "smollm") makes
    # " 3333" at least 5 tokens (" " + 4 digits); GPT-2's keeps " 3333" one piece (here 2 tokens).
    assert len(llm.tokenize(b" 3333", add_bos=False, special=False)) == len(tok.encode(" 3333")) < 5
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template


def test_f32_logits_and_greedy_match(dense, tok, load_llama):
    model, paths = dense
    llm = load_llama(paths["f32"], f32_cache=True)
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours, theirs = our_logits(model, ids), llama_logits(llm, ids)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        # Greedy, 32 tokens: ours by full recompute, llama.cpp token by token through its KV cache.
        mine = our_greedy(model, ids, 32)
        assert llama_greedy(llm, ids, 32) == mine, prompt
        assert len(set(mine)) > 3, f"degenerate continuation {mine}: the fixture trains too little"
    # Measured 2.0e-5 (logits span +-18), about what our own float32 is off float64 (1.4e-5); float32 summation
    # order is the only difference. With llama.cpp's default f16 KV cache: 2.0e-2, and one of the three greedy
    # continuations parts from ours after 14 tokens (a near tie), hence the f32 cache here.
    assert worst < 2e-4, worst


@pytest.mark.parametrize("dtype,max_diff,min_top1", [("f16", 0.1, 0.97), ("q8_0", 1.5, 0.95)])
def test_reduced_precision_stays_close(dense, tok, load_llama, dtype, max_diff, min_top1):
    """Teacher-forced over each prompt plus our 32-token greedy continuation (125 positions), with llama.cpp's
    default f16 KV cache: max |logit diff| and the share of positions where llama.cpp's argmax is ours."""
    model, paths = dense
    llm = load_llama(paths[dtype])
    diffs, agree, total = [], 0, 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ids = ids + our_greedy(model, ids, 32)
        ours, theirs = our_logits(model, ids), llama_logits(llm, ids)
        diffs.append(float(np.abs(ours - theirs).max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
    # Measured (logits span +-18): f16 max diff 0.033, top-1 125/125; q8_0 max diff 0.55 (median per position
    # 0.07-0.13: llama.cpp quantises the activations to Q8_0 too), top-1 124/125; with token_embd (the tied
    # head) left f16 instead, q8_0 gives 0.37 and still 124/125. Bounds are ~3x the measurements.
    assert max(diffs) < max_diff, diffs
    assert agree / total >= min_top1, (agree, total)


def test_moe_exports_as_deepseek_when_exact(tok, load_llama, tmp_path):
    """norm_topk_prob=false is exactly llama.cpp's deepseek MoE: logits and greedy agree."""
    cfg = dataclasses.replace(get_preset("tiny-moe"), norm_topk_prob=False)
    ckpt = train_checkpoint(cfg, tok, tmp_path / "moe", steps=60)
    info = export_gguf(ckpt, tmp_path / "moe.gguf", "f32")
    assert info["arch"] == "deepseek"
    model, _ = load_checkpoint(ckpt)
    model.eval()
    llm = load_llama(info["path"], f32_cache=True)
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        worst = max(worst, float(np.abs(our_logits(model, ids) - llama_logits(llm, ids)).max()))
        assert llama_greedy(llm, ids, 32) == our_greedy(model, ids, 32), prompt
    assert worst < 2e-4, worst  # measured 3.8e-6 (f16 KV cache: 1.1e-3)
    for dtype, bound in (("f16", 0.05), ("q8_0", 0.3)):  # measured 0.008 and 0.06, top-1 125/125 both
        llm = load_llama(export_gguf(ckpt, tmp_path / f"moe-{dtype}.gguf", dtype)["path"])
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            ours, theirs = our_logits(model, ids), llama_logits(llm, ids)
            assert np.abs(ours - theirs).max() < bound, (dtype, prompt)
            assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.8, (dtype, prompt)


@pytest.mark.parametrize("variant", [dict(num_experts_per_tok=1, norm_topk_prob=True),  # top-1: never renormalised
                                     dict(num_shared_experts=0, norm_topk_prob=False),  # a zero shared expert
                                     dict(num_shared_experts=2, norm_topk_prob=False)],  # concatenated shared
                         ids=["top1-norm", "no-shared", "two-shared"])
def test_moe_variants_export_exactly(tok, load_llama, tmp_path, variant):
    """Untrained, but with weights 5x the usual init, so logits span several units (|max| 3.2-4.0) and routing
    is decisive. Measured max diffs 1.7e-6 to 3.1e-6."""
    model = sharp_moe(**variant)
    save_checkpoint(model, tmp_path / "moe", tokenizer=tok)
    llm = load_llama(export_gguf(tmp_path / "moe", tmp_path / "moe.gguf")["path"], f32_cache=True)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours, theirs = our_logits(model, ids), llama_logits(llm, ids)
        assert np.abs(ours).max() > 1
        assert np.abs(ours - theirs).max() < 2e-4, prompt


def sharp_moe(**variant):
    torch.manual_seed(1)
    model = MiniMind(dataclasses.replace(get_preset("tiny-moe"), **variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return model


def test_renormalised_moe_as_deepseek_would_be_wrong(tok, load_llama, tmp_path, monkeypatch):
    """The reason for the refusal, measured: written anyway, a norm_topk_prob=true model's logits are off by
    0.65-0.77 (|max| 3.2-3.5) in llama.cpp, which never renormalises the top-k weights."""
    import minimind.export
    model = sharp_moe(norm_topk_prob=True)
    save_checkpoint(model, tmp_path / "moe", tokenizer=tok)
    monkeypatch.setattr(minimind.export, "moe_export_problem", lambda cfg: None)
    llm = load_llama(export_gguf(tmp_path / "moe", tmp_path / "moe.gguf")["path"], f32_cache=True)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert np.abs(our_logits(model, ids) - llama_logits(llm, ids)).max() > 0.2, prompt


def test_moe_with_renormalised_topk_is_refused(tok, tmp_path):
    ckpt = tmp_path / "moe"
    save_checkpoint(MiniMind(get_preset("tiny-moe")), ckpt, tokenizer=tok)
    with pytest.raises(ValueError, match=r"norm_topk_prob=true.*deepseek.*norm_w=false"):
        export_gguf(ckpt, tmp_path / "moe.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------------ errors, CLI


def test_dtype_and_input_errors(tmp_path, dense_ckpt):
    with pytest.raises(ValueError, match="k-quants.*256.*1408"):
        check_dtype("q4_k_m")
    with pytest.raises(ValueError, match="unknown"):
        check_dtype("int4")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json"))):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    no_tok = tmp_path / "no-tok"
    model, _ = load_checkpoint(dense_ckpt)
    save_checkpoint(model, no_tok)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_gguf(no_tok, tmp_path / "x.gguf")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minimind", "export", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_export(dense_ckpt, tmp_path):
    proc = run_cli(dense_ckpt, "--format", "ollama", "--out", tmp_path / "oll", "--dtype", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert "llama q8_0" in proc.stdout and "ollama create" in proc.stdout
    r = gguf.GGUFReader(str(tmp_path / "oll" / "model.gguf"))
    assert r.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert (tmp_path / "oll" / "Modelfile").read_text().startswith("FROM ./model.gguf\n")
    proc = run_cli(tmp_path / "nowhere", "--out", tmp_path / "x.gguf", "--dtype", "q8_0")
    assert proc.returncode == 2 and str(tmp_path / "nowhere") in proc.stderr
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------------ Ollama


class GoTemplate:
    """The subset of Go's text/template the Modelfile uses: text, {{ pipeline }}, if / else if / else / end,
    range / end, the trim markers {{- and -}}, fields (.A.B, (pipe).A), string and int literals, and the
    functions eq, ne, and, or, not, index, len. Anything else raises, so the template cannot quietly use
    syntax this renderer gets wrong."""

    ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
    TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\.[A-Za-z_][\w.]*|\.|[A-Za-z_]\w*)')
    WS = " \t\r\n"

    def __init__(self, source: str):
        parts, pos = [], 0  # text and ("action", words)
        for m in self.ACTION.finditer(source):
            parts.append(source[pos:m.start()])
            parts.append(("action", m.group(2).strip(), bool(m.group(1)), bool(m.group(3))))
            pos = m.end()
        parts.append(source[pos:])
        for i, p in enumerate(parts):  # apply trim markers to the neighbouring text
            if isinstance(p, tuple):
                if p[2]:
                    parts[i - 1] = parts[i - 1].rstrip(self.WS)
                if p[3]:
                    parts[i + 1] = parts[i + 1].lstrip(self.WS)
        self.items = [p if isinstance(p, str) else p[1] for p in parts]
        self.pos = 0
        self.tree = self._block(top=True)

    def _block(self, top=False):
        nodes = []
        while self.pos < len(self.items):
            item = self.items[self.pos]
            self.pos += 1
            if self.pos % 2:  # even index: text
                if item:
                    nodes.append(("text", item))
                continue
            word = item.split(None, 1)[0] if item else ""
            if word in ("end", "else"):
                if top:
                    raise ValueError(f"unexpected {{{{ {item} }}}}")
                return nodes, item
            if word == "if":
                branches, rest = [], item[2:]
                while True:
                    body, closer = self._block()
                    branches.append((rest, body))
                    if closer == "end":
                        break
                    if closer == "else":
                        body, closer = self._block()
                        if closer != "end":
                            raise ValueError("else must be followed by end")
                        branches.append((None, body))
                        break
                    if not closer.startswith("else if "):
                        raise ValueError(f"unsupported {closer!r}")
                    rest = closer[len("else if "):]
                nodes.append(("if", branches))
            elif word == "range":
                body, closer = self._block()
                if closer != "end":
                    raise ValueError("range ... else is not supported")
                nodes.append(("range", item[len("range"):], body))
            else:
                nodes.append(("expr", item))
        if not top:
            raise ValueError("missing {{ end }}")
        return nodes

    # -- expressions
    def _tokens(self, src):
        out, pos, src = [], 0, src.strip()
        while pos < len(src):
            m = self.TOKEN.match(src, pos)
            if not m:
                raise ValueError(f"cannot parse {src[pos:]!r}")
            out.append((m.group(1), m.start(1) == pos))  # (token, adjacent to the previous one)
            pos = m.end()
        return out

    def _eval(self, src, dot):
        toks = self._tokens(src)
        value, rest = self._pipeline(toks, 0, dot)
        if rest != len(toks):
            raise ValueError(f"trailing tokens in {src!r}")
        return value

    def _field(self, value, path):
        for name in [p for p in path.split(".") if p]:
            if not isinstance(value, dict) or name not in value:
                raise ValueError(f"no field {name} in {value!r}")
            value = value[name]
        return value

    def _operand(self, toks, i, dot):
        tok, _ = toks[i]
        if tok == "(":
            value, i = self._pipeline(toks, i + 1, dot)
            if toks[i][0] != ")":
                raise ValueError("missing )")
            i += 1
        elif tok.startswith('"'):
            value, i = json.loads(tok), i + 1
        elif re.fullmatch(r"-?\d+", tok):
            value, i = int(tok), i + 1
        elif tok.startswith("."):
            value, i = self._field(dot, tok), i + 1
        else:
            raise ValueError(f"unsupported operand {tok!r}")
        while i < len(toks) and toks[i][1] and toks[i][0].startswith(".") and toks[i][0] != ".":
            value, i = self._field(value, toks[i][0]), i + 1  # (pipe).Field
        return value, i

    FUNCS = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b,
             "and": lambda *a: next((x for x in a if not GoTemplate.truth(x)), a[-1]),
             "or": lambda *a: next((x for x in a if GoTemplate.truth(x)), a[-1]),
             "not": lambda a: not GoTemplate.truth(a), "index": lambda a, *k: GoTemplate._index(a, k),
             "len": len}

    @staticmethod
    def _index(a, keys):
        for k in keys:
            a = a[k]  # IndexError for out of range, as Go's index errors
        return a

    def _pipeline(self, toks, i, dot):
        tok, _ = toks[i]
        if tok in self.FUNCS:
            args, i = [], i + 1
            while i < len(toks) and toks[i][0] != ")":
                value, i = self._operand(toks, i, dot)
                args.append(value)
            return self.FUNCS[tok](*args), i
        if re.fullmatch(r"[A-Za-z_]\w*", tok):
            raise ValueError(f"unsupported function {tok!r}")
        return self._operand(toks, i, dot)

    @staticmethod
    def truth(v):
        return not (v is None or v is False or v == 0 or v == "" or (isinstance(v, (list, dict)) and not v))

    def _run(self, nodes, dot, out):
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "expr":
                v = self._eval(node[1], dot)
                out.append(v if isinstance(v, str) else str(v))
            elif node[0] == "if":
                for cond, body in node[1]:
                    if cond is None or self.truth(self._eval(cond, dot)):
                        self._run(body, dot, out)
                        break
            else:
                for element in self._eval(node[1], dot):
                    self._run(node[2], element, out)

    def render(self, data) -> str:
        out = []
        self._run(self.tree, data, out)
        return "".join(out)


def ollama_values(messages):
    """What Ollama passes a .Messages template (server side, api.Message fields): Messages with Role and
    Content, and System, the system messages' contents joined."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "Tools": None, "Response": ""}


CONVERSATIONS = [
    [("user", "你好")],
    [("system", "你是一个乐于助人的助手。"), ("user", "草莓是什么颜色的？")],
    [("user", "What does 27 + 62 equal?"), ("assistant", "27 plus 62 equals 89."), ("user", "And 27 + 63?")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Name a fruit.")],
    [("user", "one"), ("assistant", "1"), ("user", "two"), ("assistant", "2"), ("user", "three")],
    [("system", "multi\nline  system "), ("user", "  spaces \n\n and newlines\n"), ("assistant", "ok\n"),
     ("user", "{{ .Role }} is not a template here"), ("assistant", "好的"), ("user", "再见")],
    [("user", "a question"), ("assistant", "an answer")],  # ends with an assistant turn
    [("system", "")],                                      # empty system prompt: kept, not the default
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: f"{len(c)}msgs-{c[0][0]}")
def test_ollama_template_renders_our_chat_template(tok, conv):
    messages = [{"role": r, "content": c} for r, c in conv]
    ours = tok.apply_chat_template(messages, tokenize=False)
    assert GoTemplate(ollama_template()).render(ollama_values(messages)) == ours


def test_modelfile(tok, load_llama, dense_ckpt, tmp_path):
    info = export_ollama(dense_ckpt, tmp_path / "oll", "f16")
    text = (tmp_path / "oll" / "Modelfile").read_text(encoding="utf-8")
    gen = json.loads((dense_ckpt / GENERATION_CONFIG).read_text())
    assert text == modelfile_text(tok, gen) and info["path"] == str(tmp_path / "oll" / "model.gguf")
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert template == ollama_template()
    assert re.findall(r'PARAMETER stop "(.*)"', text) == ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    assert f"PARAMETER temperature {gen['temperature']}\n" in text and f"PARAMETER top_p {gen['top_p']}\n" in text
    # A template rendering reaches the model as the same ids our tokenizer gives the same conversation.
    messages = [{"role": r, "content": c} for r, c in CONVERSATIONS[3]]
    rendered = GoTemplate(template).render(ollama_values(messages))
    llm = load_llama(info["path"])
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == tok.apply_chat_template(
        messages, tokenize=True)
