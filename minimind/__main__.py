"""`python -m minimind {new,info,generate,convert,merge-lora,export}`: checkpoint tools for users.

  new       write a freshly initialised checkpoint directory (with a tokenizer)
  info      verify a checkpoint (config, safetensors, no pickles) and print preset, parameters, files
  generate  stream a completion (or a chat reply with --chat) to the terminal
  convert   turn an original MiniMind .pth state dict into a checkpoint directory
  merge-lora  fold a LoRA adapter (PEFT format, or this project's earlier one) into a base checkpoint
  export    write a checkpoint as a GGUF file (llama.cpp) or an Ollama folder (model.gguf + Modelfile)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import CONFIG, load_checkpoint, load_minimind_pth, save_checkpoint, verify_checkpoint
from .config import PRESETS, get_preset
from .generate import SamplingParams, TextStream, stream_generate
from .model import MiniMind

BUNDLED_CORPUS = Path(__file__).parent / "data" / "sample_corpus.jsonl"


def default_tokenizer():
    """The tokenizer the project trains from its bundled sample corpus (vocab 6400)."""
    from .tokenizer import iter_jsonl_texts, train_tokenizer
    return train_tokenizer(iter_jsonl_texts([BUNDLED_CORPUS]), vocab_size=6400)


def resolve_tokenizer(path):
    from .tokenizer import Tokenizer
    if path is None:
        return default_tokenizer()
    p = Path(path)
    return Tokenizer.from_dir(p) if p.is_dir() else Tokenizer.from_file(p)


def cmd_new(args):
    cfg = get_preset(args.preset)
    torch.manual_seed(args.seed)
    model = MiniMind(cfg)
    tok = resolve_tokenizer(args.tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens, preset {args.preset} only {cfg.vocab_size}")
    save_checkpoint(model, args.out, tokenizer=tok)
    print(f"wrote {args.out}: preset {args.preset}, {model.num_parameters():,} parameters")


def cmd_info(args):
    ckpt = Path(args.dir)
    cfg = verify_checkpoint(ckpt)  # describe only files that are whole and safe to load
    raw = json.loads((ckpt / CONFIG).read_text(encoding="utf-8"))
    with torch.device("meta"):
        n = MiniMind(cfg).num_parameters()
    print(f"checkpoint: {ckpt}")
    print(f"preset:     {cfg.preset_name() or 'custom'}")
    print(f"model_type: {raw.get('model_type')}")
    print(f"parameters: {n:,}")
    print(f"dtype:      {raw.get('torch_dtype')}")
    print(f"layers x hidden: {cfg.num_layers} x {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads} kv, "
          f"ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}"
          + (f", experts {cfg.num_experts} (top-{cfg.num_experts_per_tok}) + {cfg.num_shared_experts} shared"
             if cfg.is_moe else ""))
    print("files:")
    for f in sorted(ckpt.iterdir()):
        if f.is_file():
            print(f"  {f.name:28s} {f.stat().st_size:>12,} bytes")


def cmd_generate(args):
    model, tok = load_checkpoint(args.dir)
    if tok is None:
        raise ValueError(f"{args.dir}: has no tokenizer.json; cannot encode a prompt")
    model.eval()
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    else:
        ids = tok.encode(args.prompt)
    if args.greedy:
        params = SamplingParams.greedy(args.max_new_tokens, stop_ids=[tok.eos_id])
    else:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, stop_ids=(tok.eos_id,), seed=args.seed)
    text = TextStream(tok)
    for token in stream_generate(model, ids, params):
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")


def cmd_convert(args):
    model = load_minimind_pth(args.pth, args.preset)
    tok = resolve_tokenizer(args.tokenizer) if args.tokenizer else None
    save_checkpoint(model, args.out, tokenizer=tok)
    print(f"wrote {args.out} from {args.pth} ({model.num_parameters():,} parameters)")


def cmd_merge_lora(args):
    from .lora import merge_adapter
    model, tok = load_checkpoint(args.base)
    save_checkpoint(merge_adapter(model, args.adapter), args.out, tokenizer=tok)
    print(f"wrote {args.out}: {args.base} + adapter {args.adapter}")


def cmd_export(args):
    from .export import export_gguf, export_ollama
    try:
        if args.format == "gguf":
            summary = export_gguf(args.dir, args.out, args.dtype)
        else:
            summary = export_ollama(args.dir, args.out, args.dtype)
    except ModuleNotFoundError as e:  # no gguf package: a message, not a traceback
        raise ValueError(str(e)) from e
    print(f"wrote {summary['path']}: {summary['arch']} {summary['dtype']}, {summary['tensors']} tensors, "
          f"{summary['bytes']:,} bytes in {summary['seconds']:.1f} s"
          + (f"; f16 instead of q8_0 (rows not a multiple of 32): {', '.join(summary['f16_fallbacks'])}"
             if summary["f16_fallbacks"] else ""))
    if "modelfile" in summary:
        print(f"wrote {summary['modelfile']}; then: ollama create NAME -f {summary['modelfile']}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minimind", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("new", help="write a freshly initialised checkpoint")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding one; default: train one "
                                       "from the bundled sample corpus")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_new)
    p = sub.add_parser("info", help="describe a checkpoint directory")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="render the prompt through the chat template")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.85)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("convert", help="convert an original MiniMind .pth into a checkpoint directory")
    p.add_argument("pth")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into a base checkpoint")
    p.add_argument("base")
    p.add_argument("adapter", help="directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_merge_lora)
    from .export import DTYPE_HELP, FORMATS
    p = sub.add_parser("export", help="write a checkpoint as GGUF (llama.cpp) or an Ollama model folder",
                       description="Export a checkpoint directory. --format gguf writes one .gguf file (llama "
                                   "arch; MoE as deepseek only when its math is exactly ours: norm_topk_prob=false "
                                   "or top-1 routing, see minimind/export.py); "
                                   "--format ollama writes OUT/model.gguf and OUT/Modelfile.")
    p.add_argument("dir", help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--format", default="gguf", choices=FORMATS)
    p.add_argument("--out", required=True, help="the .gguf file (gguf) or the folder to write (ollama)")
    p.add_argument("--dtype", default="f32", help=DTYPE_HELP)
    p.set_defaults(fn=cmd_export)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
