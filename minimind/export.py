"""Export a checkpoint directory as a GGUF file for llama.cpp, or as an Ollama model folder.

    python -m minimind export DIR --format gguf   --out model.gguf [--dtype f32|f16|q8_0]
    python -m minimind export DIR --format ollama --out OUTDIR     (OUTDIR/model.gguf + OUTDIR/Modelfile)

What the file holds (checked against llama.cpp itself by tests/test_export_gguf.py):

* Dense models use llama.cpp's `llama` architecture. Our RoPE rotates the two halves of each head
  (Hugging Face's rotate_half layout, see minimind/model.py); llama.cpp's `llama` rotates adjacent pairs, so
  the rows of every head of q_proj and k_proj are reordered (row i of the first half, then row i of the second
  half, ...). q.k is unchanged by a permutation applied to both, and the rotation then matches. RoPE base =
  our rope_theta. The tied LM head has no `output.weight`: llama.cpp reuses `token_embd.weight`.
* Tokenizer: `tokenizer.ggml.model = "gpt2"` (byte-level BPE: tokens + merges) with `tokenizer.ggml.pre =
  "gpt-2"`, the pre-tokeniser whose split regex is the one our ByteLevel pre-tokeniser uses (llama.cpp picks
  the regex by that name; "qwen2"/"smollm" split digits one by one, so " 3333" would come out as 5 tokens, not
  4). Special tokens are CONTROL tokens (so llama.cpp only matches them with parse_special, the way our
  `encode_plain` never produces them); model rows beyond the tokenizer's vocabulary get UNUSED `[PAD<i>]`
  tokens. bos/eos/pad ids, `add_bos_token = false` and the chat template are carried. The GPT-2 regex is also
  written as `tokenizer.ggml.pretokenizer`, the key Ollama's own Go engine reads (its default is Llama 3's
  regex, which groups digits in threes); llama.cpp ignores that key.
* --dtype: `f32` writes every tensor as float32 (bit-exact weights). `f16` writes 2-D (and stacked 3-D expert)
  weight matrices as float16 and keeps norms (and the MoE router) float32. `q8_0` quantises the same matrices
  with gguf.quants to Q8_0 (blocks of 32 values along a row, one f16 scale each), token_embd included (it is
  also the tied output head; llama.cpp's llama-quantize does the same for Q8_0); norms and the router stay
  float32; a matrix whose row length is not a multiple of 32 falls back to f16 (none in our presets: every
  width is a multiple of 64), and the summary lists it. K-quants (q4_k, q5_k, q6_k, ...) are not offered: they
  pack rows in super-blocks of 256 values and the `small` preset's FFN is 1408 wide (1408 = 5.5 x 256), so its
  ffn_down rows cannot be k-quantised at all; quantise an f16/f32 export with llama.cpp's llama-quantize,
  which substitutes another type per tensor, if you want them.
* MoE checkpoints use llama.cpp's `deepseek` architecture (DeepSeek-V1 MoE) when, and only when, it computes
  exactly our MoE. In llama.cpp (src/models/deepseek.cpp) every MoE layer calls build_moe_ffn with
  gating LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX and norm_w = false, then adds the shared experts unweighted:
  softmax over all experts, top-k by probability, the raw top-k probabilities as weights (times
  expert_weights_scale, written as 1.0), plus shared experts. Ours (minimind/model.py MoEGate) is the same
  except that with norm_topk_prob = true and top-k > 1 it divides the top-k weights by their sum. A constant
  expert_weights_scale cannot reproduce a per-token division, so such checkpoints (every MoE preset: the
  default is norm_topk_prob = true) are refused with that reason; norm_topk_prob = false, or top-1 routing
  (which we never renormalise), exports exactly. Several shared experts become one shared FFN of the summed
  width (a sum of SwiGLU FFNs is the SwiGLU FFN of their concatenation); no shared expert becomes a zero one.

This module needs torch, numpy and the `gguf` package (imported when an export runs), not Ray.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from .checkpoint import GENERATION_CONFIG, WEIGHTS, generation_config, load_config, read_weights, verify_checkpoint
from .config import ModelConfig

FORMATS = ("gguf", "ollama")
DTYPES = ("f32", "f16", "q8_0")
DTYPE_HELP = ("f32: every tensor float32 (exact weights); f16: weight matrices float16, norms float32; "
              "q8_0: weight matrices (token_embd included) Q8_0, norms float32. K-quants (q4_k, q5_k, q6_k, "
              "...) are not offered: they need rows divisible by 256 and the small preset's FFN is 1408 wide; "
              "quantise an f16 export with llama.cpp's llama-quantize instead")
# The split regex of tokenizers' ByteLevel pre-tokeniser (use_regex=True), i.e. GPT-2's.
GPT2_SPLIT_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
Q8_BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ModuleNotFoundError("GGUF export needs the `gguf` package (pip install gguf); it is not "
                                  "installed") from e
    return gguf


def check_dtype(dtype: str) -> str:
    d = dtype.lower()
    if d in DTYPES:
        return d
    if "_k" in d or d.startswith(("iq", "tq")):
        raise ValueError(f"--dtype {dtype}: k-quants and i-quants are not offered. They pack each row in "
                         f"super-blocks of 256 values, and the small preset's FFN is 1408 wide (5.5 x 256), so "
                         f"its ffn_down rows cannot be k-quantised; choose one of {', '.join(DTYPES)}, or run "
                         f"llama.cpp's llama-quantize on an f16 export (it picks another type per tensor)")
    raise ValueError(f"--dtype {dtype}: unknown; choose one of {', '.join(DTYPES)}")


# ------------------------------------------------------------------------------------------------ tokenizer


def _check_byte_level(tok) -> dict:
    """The tokenizer.json, after checking that llama.cpp's gpt2/"gpt-2" tokeniser reproduces it: plain byte-level
    BPE, GPT-2 regex, no normaliser, no prefix space, merges applied (not whole-word lookups first)."""
    spec = json.loads(tok.to_json())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    problems = []
    if spec.get("normalizer") is not None:
        problems.append(f"it has a normalizer ({spec['normalizer'].get('type')})")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append(f"its pre-tokenizer is {pre.get('type')} (add_prefix_space={pre.get('add_prefix_space')}, "
                        f"use_regex={pre.get('use_regex')}), not plain ByteLevel with the GPT-2 regex")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("its model is not plain BPE")
    if problems:
        raise ValueError("tokenizer cannot be expressed as llama.cpp's gpt2 tokenizer: " + "; ".join(problems))
    return spec


def gguf_vocab(tok, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for the GGUF tokenizer keys, padded to the model's `n_rows` embedding rows."""
    gguf = _gguf()
    TT = gguf.TokenType
    spec = _check_byte_level(tok)
    n = tok.vocab_size
    if n > n_rows:
        raise ValueError(f"tokenizer has {n} tokens but the model only {n_rows} embedding rows")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n):
        t = tok.backend.id_to_token(i)
        if t is None:
            raise ValueError(f"tokenizer has no token with id {i} (ids must be contiguous)")
        tokens.append(t)
        if i in added:
            types.append(int(TT.CONTROL if added[i].special else TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
    for i in range(n, n_rows):  # rows the tokenizer never produces: names llama.cpp can never match
        tokens.append(f"[PAD{i}]")
        types.append(int(TT.UNUSED))
    merges = []
    for m in spec["model"].get("merges", []):
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise ValueError(f"merge {m!r} cannot be written as a GGUF merge ('left right')")
        merges.append(f"{pair[0]} {pair[1]}")
    return tokens, types, merges


# ------------------------------------------------------------------------------------------------ weights


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from rotate-half pairs (i, i + D/2) to adjacent pairs
    (2i, 2i + 1) in every head: new row 2i + j of a head is old row j * D/2 + i."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def moe_export_problem(cfg: ModelConfig) -> str | None:
    """Why a MoE config cannot be exported exactly as llama.cpp's deepseek arch, or None when it can."""
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        return (f"MoE export refused: this checkpoint renormalises its top-{cfg.num_experts_per_tok} router "
                f"weights to sum to 1 (norm_topk_prob=true), but llama.cpp's deepseek architecture, the only one "
                f"with our softmax router plus unweighted shared experts, never does (src/models/deepseek.cpp "
                f"calls build_moe_ffn with norm_w=false) and its expert_weights_scale is one constant, not a "
                f"per-token division; the GGUF would be a different model. Checkpoints trained with "
                f"norm_topk_prob=false (or top-1 routing) export exactly")
    return None


def _tensors(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    """(gguf name, float32 tensor, kind) for every tensor; kind 'norm' / 'router' stay float32."""
    f = {k: v.float() for k, v in sd.items()}
    yield "token_embd.weight", f["model.embed_tokens.weight"], "matrix"
    yield "output_norm.weight", f["model.norm.weight"], "norm"
    if not cfg.tie_word_embeddings:
        yield "output.weight", f["lm_head.weight"], "matrix"
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        yield b + "attn_norm.weight", f[p + "input_layernorm.weight"], "norm"
        yield b + "attn_q.weight", permute_rope_rows(f[p + "self_attn.q_proj.weight"], cfg.num_heads), "matrix"
        yield b + "attn_k.weight", permute_rope_rows(f[p + "self_attn.k_proj.weight"], cfg.num_kv_heads), "matrix"
        yield b + "attn_v.weight", f[p + "self_attn.v_proj.weight"], "matrix"
        yield b + "attn_output.weight", f[p + "self_attn.o_proj.weight"], "matrix"
        yield b + "ffn_norm.weight", f[p + "post_attention_layernorm.weight"], "norm"
        if not cfg.is_moe:
            for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                yield f"{b}{theirs}.weight", f[f"{p}mlp.{ours}.weight"], "matrix"
            continue
        yield b + "ffn_gate_inp.weight", f[p + "mlp.gate.weight"], "router"  # (E, C)
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            stacked = torch.stack([f[f"{p}mlp.experts.{e}.{ours}.weight"] for e in range(cfg.num_experts)])
            yield f"{b}{theirs}_exps.weight", stacked, "matrix"  # (E, rows, cols)
            shared = [f[f"{p}mlp.shared_experts.{e}.{ours}.weight"] for e in range(cfg.num_shared_experts)]
            if not shared:  # deepseek requires a shared expert: an all-zero one adds exactly 0
                rows, cols = stacked.shape[1:]
                shared = [torch.zeros(rows, cols)]
            yield f"{b}{theirs}_shexp.weight", torch.cat(shared, dim=1 if ours == "down_proj" else 0), "matrix"


def _encode(gguf, name: str, t: torch.Tensor, kind: str, dtype: str, fallbacks: list[str]):
    a = np.ascontiguousarray(t.numpy().astype(np.float32))
    if dtype == "f32" or kind != "matrix":
        return a, None
    if dtype == "f16":
        return a.astype(np.float16), None
    if a.shape[-1] % Q8_BLOCK:
        fallbacks.append(name)
        return a.astype(np.float16), None
    qt = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(a, qt), qt


# ------------------------------------------------------------------------------------------------ writing


def _atomic_target(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def export_gguf(ckpt_dir, out, dtype: str = "f32") -> dict:
    """Write checkpoint directory `ckpt_dir` as GGUF file `out`. Returns a summary (arch, dtype, bytes,
    seconds, tensors, f16 fallbacks). Raises ValueError / FileNotFoundError naming the problem."""
    start = time.perf_counter()
    dtype = check_dtype(dtype)
    ckpt, out = Path(ckpt_dir), Path(out)
    cfg = verify_checkpoint(ckpt)
    if not (ckpt / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{ckpt / 'tokenizer.json'}: missing; a GGUF file must carry the tokenizer")
    if cfg.is_moe and (problem := moe_export_problem(cfg)):
        raise ValueError(f"{ckpt}: {problem}")
    from .tokenizer import Tokenizer
    tok = Tokenizer.from_dir(ckpt)
    gguf = _gguf()
    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)
    sd = read_weights(ckpt / WEIGHTS)

    arch = "deepseek" if cfg.is_moe else "llama"
    tmp = _atomic_target(out)
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_name(ckpt.resolve().name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        if cfg.is_moe:
            w.add_leading_dense_block_count(0)
            w.add_expert_count(cfg.num_experts)
            w.add_expert_used_count(cfg.num_experts_per_tok)
            w.add_expert_shared_count(max(cfg.num_shared_experts, 1))
            w.add_expert_feed_forward_length(cfg.intermediate_size)
            w.add_expert_weights_scale(1.0)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_string("tokenizer.ggml.pretokenizer", GPT2_SPLIT_REGEX)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        w.add_chat_template(tok.chat_template)
        fallbacks: list[str] = []
        n = 0
        for name, t, kind in _tensors(cfg, sd):
            data, raw = _encode(gguf, name, t, kind, dtype, fallbacks)
            w.add_tensor(name, data, raw_dtype=raw)
            n += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out), "arch": arch, "dtype": dtype, "tensors": n, "bytes": out.stat().st_size,
            "seconds": time.perf_counter() - start, "f16_fallbacks": fallbacks}


# ------------------------------------------------------------------------------------------------ Ollama

DEFAULT_SYSTEM = "You are a helpful assistant"


def ollama_template(default_system: str = DEFAULT_SYSTEM) -> str:
    """A Go template (Ollama's TEMPLATE, over its .Messages) that renders our ChatML chat template's text: the
    first message's content as the system turn when its role is system, else the default system prompt; every
    user turn followed by "<|im_start|>assistant\\n"; assistant contents closed by <|im_end|>; later system
    messages dropped, as ours does."""
    return (
        '{{- if eq (index .Messages 0).Role "system" }}<|im_start|>system\n'
        "{{ (index .Messages 0).Content }}<|im_end|>\n"
        "{{ else }}<|im_start|>system\n"
        f"{default_system}<|im_end|>\n"
        "{{ end }}\n"
        "{{- range .Messages }}\n"
        '{{- if eq .Role "user" }}<|im_start|>user\n'
        "{{ .Content }}<|im_end|>\n"
        "<|im_start|>assistant\n"
        '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n'
        "{{ end }}\n"
        "{{- end }}"
    )


def modelfile_text(tok, gen: dict) -> str:
    """The Modelfile: FROM ./model.gguf, our chat template as TEMPLATE, stops on every special token,
    temperature and top_p from generation_config.json."""
    from .tokenizer import CHAT_TEMPLATE
    if tok.chat_template != CHAT_TEMPLATE:
        raise ValueError("this checkpoint's chat template is not MiniMind's ChatML template; the Ollama "
                         "TEMPLATE is written for that one only")
    template = ollama_template()
    if '"""' in template:
        raise ValueError('the template contains """, which a Modelfile cannot quote')
    specials = sorted(tok.backend.get_added_tokens_decoder()[i].content for i in tok.special_ids)
    lines = ["FROM ./model.gguf", "", f'TEMPLATE """{template}"""', ""]
    # The eos first: it ends an assistant turn; the others must never be generated as text.
    for s in [tok.eos_token] + [s for s in specials if s != tok.eos_token]:
        lines.append(f'PARAMETER stop "{s}"')
    for key in ("temperature", "top_p"):
        if key in gen:
            lines.append(f"PARAMETER {key} {gen[key]}")
    return "\n".join(lines) + "\n"


def export_ollama(ckpt_dir, out_dir, dtype: str = "f32") -> dict:
    """Write OUTDIR/model.gguf and OUTDIR/Modelfile (`ollama create NAME -f OUTDIR/Modelfile`)."""
    from .tokenizer import Tokenizer
    ckpt, out_dir = Path(ckpt_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory (--format ollama writes a folder)")
    check_dtype(dtype)
    load_config(ckpt)  # a clear error before anything is written
    if not (ckpt / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{ckpt / 'tokenizer.json'}: missing; a GGUF file must carry the tokenizer")
    tok = Tokenizer.from_dir(ckpt)
    gen_path = ckpt / GENERATION_CONFIG
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else generation_config()
    modelfile = modelfile_text(tok, gen)
    summary = export_gguf(ckpt, out_dir / "model.gguf", dtype)
    (out_dir / "Modelfile").write_text(modelfile, encoding="utf-8")
    summary["modelfile"] = str(out_dir / "Modelfile")
    return summary
