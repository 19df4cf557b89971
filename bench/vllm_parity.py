"""Greedy parity of vLLM (CPU backend) with MiniMind's own generation on one checkpoint directory.

vLLM loads the checkpoint directory as it is (no conversion: a dense checkpoint is a `model_type: llama`
directory). Both sides decode greedily with EOS ignored, `--max-tokens` tokens per prompt:
  ours   minimind.checkpoint.load_checkpoint + minimind.generate.generate (KV cache), fp32, in the project env;
  vllm   vllm.LLM(model=DIR, dtype="float32").generate(..., SamplingParams(temperature=0, ignore_eos=True)),
         in the separate vLLM env (bench/vllm_env.sh).
The two envs cannot share a process, so this script runs itself in each (`--role ours|vllm`) through
subprocess, and the driver compares the token ids. Prompts: token-id prompts (chat-template encodings and raw
id lists, the same ids on both sides, so no tokenizer is involved) and text prompts (each side tokenises
with its own tokenizer: ours `Tokenizer.encode`, vLLM transformers' from the same tokenizer files; the prompt
ids are compared too). Where the outputs split, the driver reports our logits' margin at that position
between our token and vLLM's (a near-tie that fp32 summation order can flip, or a real difference).

  bash bench/vllm_env.sh                          # once: the vLLM env in .venv-vllm/
  python bench/vllm_parity.py                     # trains a small checkpoint first when --model is not given
  python bench/vllm_parity.py --model DIR --max-tokens 32
Prints a table and writes bench/results/vllm_parity.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "out" / "vllm_parity"  # gitignored: the default checkpoints and the vLLM log
DEFAULT_CKPT = WORK / "small-trained"
RANDOM_CKPT = WORK / "small-random"
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SHARED_TOKENIZER = REPO.parent / "shared" / "data" / "minimind"

# The default checkpoints, both preset `small` (head_dim 64; vLLM's CPU attention takes head sizes 32, 64,
# 80, ..., so `tiny`'s head_dim 16 does not load): one pretrained for a few CPU minutes on the bundled sample
# (its greedy output soon settles into repeating a token or two), and one with random weights (seed 0; its
# output wanders over the vocabulary, so near-ties are met and every position tests the logits' argmax).
TRAIN_ARGS = ["--preset", "small", "--no-ray", "--max-steps", "40", "--max-seq-len", "128", "--batch-size", "8",
              "--lr", "2e-3", "--log-interval", "10"]

TEXT_PROMPTS = ["The quick brown fox", "Once upon a time, in a small village,", "1, 2, 3, 4,",
                "人工智能是", "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"]
CHAT_QUESTIONS = ["hi", "Who are you?", "What can you do?", "请介绍一下你自己"]


def vllm_env(extra: dict | None = None) -> dict:
    """Environment of every vLLM process started here: its processes talk over loopback (by default vLLM
    finds 'its' IP by routing towards a public address), no usage-stats reporting, no hub look-ups, and a
    KV cache of VLLM_CPU_KVCACHE_SPACE GiB (1 unless set: 131k tokens of the small preset's fp32 KV)."""
    return {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
            "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(extra or {})}


def vllm_kwargs(max_model_len: int) -> dict:
    """What vLLM needs for our directory: fp32 (the checkpoint's dtype; vLLM's CPU default would be bf16)
    and a max_model_len (the config's max_position_embeddings is 32768; the KV cache is sized from
    VLLM_CPU_KVCACHE_SPACE either way, a smaller length only keeps the scheduler's limits honest)."""
    return {"dtype": "float32", "max_model_len": max_model_len, "seed": 0}


# ------------------------------------------------------------------------------------------------- roles

def role_vllm(spec: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **vllm_kwargs(spec["max_model_len"]))
    load_s = time.perf_counter() - t0
    # logprobs=1 / prompt_logprobs=1: the top-1 token and the chosen token's log-probability at every prompt
    # and output position (raw logits' log_softmax: vLLM's default logprobs_mode), compared with ours below.
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=1,
                            prompt_logprobs=1)
    prompts = [{"prompt_token_ids": p["ids"]} if p["kind"] == "ids" else p["text"] for p in spec["prompts"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    gen_s = time.perf_counter() - t0
    import torch
    return {"vllm": vllm.__version__, "torch": torch.__version__, "load_s": load_s, "generate_s": gen_s,
            "results": [{"prompt_ids": list(o.prompt_token_ids), "output_ids": list(o.outputs[0].token_ids),
                         **teacher_forced_vllm(o)} for o in outs]}


def teacher_forced_vllm(o) -> dict:
    """Per position 1.. of prompt + output: vLLM's top-1 token and the log-probability of the actual token."""
    prompt, output = list(o.prompt_token_ids), list(o.outputs[0].token_ids)
    argmax, logprobs = [], []
    for i, lp in enumerate(o.prompt_logprobs or []):
        if i == 0 or lp is None:  # the first prompt token has no prediction
            continue
        argmax.append(next(t for t, v in lp.items() if v.rank == 1))
        logprobs.append(lp[prompt[i]].logprob)
    for t, lp in zip(output, o.outputs[0].logprobs or []):
        argmax.append(next(k for k, v in lp.items() if v.rank == 1))
        logprobs.append(lp[t].logprob)
    return {"argmax": argmax, "token_logprobs": logprobs}


def role_ours(spec: dict) -> dict:
    import torch

    from minimind.checkpoint import load_checkpoint
    from minimind.generate import SamplingParams, generate

    torch.manual_seed(0)
    model, tok = load_checkpoint(spec["model"], dtype=torch.float32)
    model.eval()
    results = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in spec["prompts"]:
            ids = p["ids"] if p["kind"] == "ids" else tok.encode(p["text"])
            t1 = time.perf_counter()
            out = generate(model, ids, SamplingParams.greedy(spec["max_tokens"]))  # no stop ids: EOS ignored
            gen_s = time.perf_counter() - t1
            seq = torch.tensor([ids + out])  # teacher-forced: one full forward, no cache
            logp = torch.log_softmax(model(seq).logits[0, :-1].float(), dim=-1)
            results.append({"prompt_ids": ids, "output_ids": out, "generate_s": gen_s,
                            "argmax": logp.argmax(-1).tolist(),
                            "token_logprobs": logp.gather(1, seq[0, 1:, None])[:, 0].tolist()})
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "generate_s": time.perf_counter() - t0,
            "results": results}


def margin_at_split(model_dir: str, prompt: list[int], ours: list[int], theirs: list[int], at: int) -> dict:
    """Our fp32 logits after prompt + the common prefix: our token's and vLLM's, and the gap between them."""
    import torch

    from minimind.checkpoint import load_model

    model = load_model(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ours[:at]])).logits[0, -1]
    top2 = torch.topk(logits, 2)
    return {"ours_token": ours[at], "vllm_token": theirs[at], "ours_logit": logits[ours[at]].item(),
            "vllm_token_logit": logits[theirs[at]].item(),
            "gap": (logits[ours[at]] - logits[theirs[at]]).item(),
            "top2_gap": (top2.values[0] - top2.values[1]).item()}


# ------------------------------------------------------------------------------------------------ driver

def ensure_checkpoints(args) -> list[Path]:
    if args.model:
        return [Path(m) for m in args.model]
    # MiniMind's tokenizer from ../shared when it is there; else (a clone alone) the one a run without
    # --tokenizer trains from the bundled sample, which the random checkpoint then shares.
    tokenizer = Path(args.tokenizer) if args.tokenizer and Path(args.tokenizer).is_dir() else None
    if tokenizer is None:
        print(f"no tokenizer at {args.tokenizer}: the checkpoints use the bundled-sample tokenizer", flush=True)
    if (DEFAULT_CKPT / "config.json").is_file():
        print(f"checkpoint {DEFAULT_CKPT} (already trained)")
    else:
        cmd = [sys.executable, str(REPO / "stages" / "pretrain.py"), *TRAIN_ARGS,
               *(["--tokenizer", str(tokenizer)] if tokenizer else []), "--out", str(DEFAULT_CKPT)]
        print("training the default checkpoint:", " ".join(cmd), flush=True)
        subprocess.run(["nice", *cmd], cwd=REPO, check=True)
    if not (RANDOM_CKPT / "config.json").is_file():
        import torch

        from minimind.checkpoint import save_checkpoint
        from minimind.config import get_preset
        from minimind.model import MiniMind
        from minimind.checkpoint import load_tokenizer

        torch.manual_seed(0)
        save_checkpoint(MiniMind(get_preset("small")), RANDOM_CKPT, tokenizer=load_tokenizer(DEFAULT_CKPT))
        print(f"checkpoint {RANDOM_CKPT} (random weights, seed 0)")
    return [DEFAULT_CKPT, RANDOM_CKPT]


def make_prompts(ckpt: Path) -> list[dict]:
    from minimind.checkpoint import load_tokenizer

    tok = load_tokenizer(ckpt)
    prompts = [{"kind": "ids", "name": f"chat: {q}",
                "ids": tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)}
               for q in CHAT_QUESTIONS]
    prompts.append({"kind": "ids", "name": "ids: 1 token", "ids": [tok.bos_id]})
    prompts.append({"kind": "ids", "name": "ids: 40 fixed ids", "ids": [(37 * i + 11) % 6000 + 100 for i in range(40)]})
    prompts += [{"kind": "text", "name": f"text: {t!r}", "text": t} for t in TEXT_PROMPTS]
    return prompts


def run_role(python: str, role: str, spec_path: Path, out_path: Path, log: Path,
             env_extra: dict | None = None) -> dict:
    env = vllm_env(env_extra) if role == "vllm" else {**os.environ, **(env_extra or {})}
    cmd = ["nice", python, str(Path(__file__).resolve()), "--role", role, "--spec", str(spec_path),
           "--role-out", str(out_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {role} side failed (exit {proc.returncode}, log {log}): {' '.join(cmd)}")
    result = json.loads(out_path.read_text())
    result["process_wall_s"] = wall
    return result


def teacher_forced_diff(a: dict, b: dict) -> dict:
    """Position by position over prompt + output (where both sides saw the same sequence): is vLLM's top-1
    our argmax, and how far apart are the log-probabilities of the actual next token."""
    seq_a, seq_b = a["prompt_ids"] + a["output_ids"], b["prompt_ids"] + b["output_ids"]
    # argmax[i] is the prediction for token i + 1 from tokens 0..i: comparable while those agree, and the
    # log-probability of token i + 1 while that token agrees too.
    first = next((i for i, (x, y) in enumerate(zip(seq_a, seq_b)) if x != y), min(len(seq_a), len(seq_b)))
    n = min(first, len(a["argmax"]), len(b["argmax"]))
    m = min(first - 1, len(a["token_logprobs"]), len(b["token_logprobs"]))
    diffs = [abs(x - y) for x, y in zip(a["token_logprobs"][:m], b["token_logprobs"][:m])]
    return {"positions": n, "argmax_equal": sum(x == y for x, y in zip(a["argmax"][:n], b["argmax"][:n])),
            "distinct_argmax": len(set(a["argmax"][:n])), "max_abs_logprob_diff": max(diffs, default=0.0)}


def compare(ckpt: Path, args) -> dict:
    """Run both sides on one checkpoint; returns its JSON section."""
    config = json.loads((ckpt / "config.json").read_text())
    prompts = make_prompts(ckpt)
    spec = {"model": str(ckpt), "max_tokens": args.max_tokens, "max_model_len": args.max_model_len,
            "prompts": prompts}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(spec))
        print(f"\n== {ckpt}\nours: {sys.executable}", flush=True)
        ours = run_role(sys.executable, "ours", tmp / "spec.json", tmp / "ours.json", WORK / f"{ckpt.name}.ours.log")
        print(f"vllm: {args.vllm_python} (LLM(model={ckpt}, **{vllm_kwargs(args.max_model_len)}))", flush=True)
        theirs = run_role(args.vllm_python, "vllm", tmp / "spec.json", tmp / "vllm.json",
                          WORK / f"{ckpt.name}.vllm.log")

    rows = []
    for p, a, b in zip(prompts, ours["results"], theirs["results"]):
        split = next((i for i, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])) if x != y), None)
        if split is None and len(a["output_ids"]) != len(b["output_ids"]):
            split = min(len(a["output_ids"]), len(b["output_ids"]))
        row = {"name": p["name"], "kind": p["kind"], "prompt_ids_equal": a["prompt_ids"] == b["prompt_ids"],
               "prompt_len_ours": len(a["prompt_ids"]), "prompt_len_vllm": len(b["prompt_ids"]),
               "output_equal": a["output_ids"] == b["output_ids"] and a["prompt_ids"] == b["prompt_ids"],
               "tokens_equal_prefix": len(a["output_ids"]) if split is None else split,
               "distinct_tokens": len(set(a["output_ids"])), **teacher_forced_diff(a, b),
               "ours": a["output_ids"], "vllm": b["output_ids"]}
        if row["prompt_ids_equal"] and split is not None and split < min(len(a["output_ids"]), len(b["output_ids"])):
            row["split"] = margin_at_split(str(ckpt), a["prompt_ids"], a["output_ids"], b["output_ids"], split)
        rows.append(row)

    print(f"{'prompt':<40}{'prompt ids':>11}{'equal tokens':>14}{'distinct':>9}{'argmax':>10}{'max |dlogp|':>12}"
          f"  result")
    for r in rows:
        tf = f"{r['argmax_equal']}/{r['positions']}" if r["positions"] else "-"
        dl = f"{r['max_abs_logprob_diff']:.1e}" if r["positions"] else "-"
        print(f"{r['name'][:39]:<40}{'same' if r['prompt_ids_equal'] else 'DIFFER':>11}"
              f"{r['tokens_equal_prefix']:>8} of {args.max_tokens:<3}{r['distinct_tokens']:>9}{tf:>10}{dl:>12}  "
              f"{'EQUAL' if r['output_equal'] else 'DIFFER'}"
              + (f"  (our logit margin at the split: {r['split']['gap']:.2e})" if "split" in r else ""))
    n_equal = sum(r["output_equal"] for r in rows)
    print(f"{n_equal} of {len(rows)} prompts: identical token ids "
          f"(vllm {theirs['vllm']}: load {theirs['load_s']:.1f} s, generate {theirs['generate_s']:.2f} s; "
          f"ours: generate {ours['generate_s']:.2f} s on {ours['threads']} threads)", flush=True)
    positions = sum(r["positions"] for r in rows)
    argmax_equal = sum(r["argmax_equal"] for r in rows)
    max_diff = max((r["max_abs_logprob_diff"] for r in rows if r["positions"]), default=0.0)
    print(f"teacher-forced: vLLM's top-1 token equals our argmax at {argmax_equal} of {positions} positions "
          f"(prompt + output); largest |log-prob difference| of the actual tokens {max_diff:.2e}", flush=True)
    return {"checkpoint": str(ckpt), "model_type": config.get("model_type"),
            "teacher_forced_positions": positions, "teacher_forced_argmax_equal": argmax_equal,
            "teacher_forced_max_abs_logprob_diff": max_diff,
            "architectures": config.get("architectures"), "head_dim": config.get("head_dim"),
            "checkpoint_files": sorted(f.name for f in ckpt.iterdir()),
            "vllm_version": theirs["vllm"], "vllm_torch": theirs["torch"], "ours_torch": ours["torch"],
            "vllm_load_s": theirs["load_s"], "vllm_generate_s": theirs["generate_s"],
            "vllm_process_wall_s": theirs["process_wall_s"], "ours_generate_s": ours["generate_s"],
            "ours_threads": ours["threads"], "prompts_equal": n_equal, "prompts": len(rows), "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="*", default=[],
                    help=f"checkpoint directories (default: {DEFAULT_CKPT}, trained when absent, and {RANDOM_CKPT})")
    ap.add_argument("--tokenizer", default=str(SHARED_TOKENIZER), help="tokenizer for the default checkpoints (absent: the bundled-sample one)")
    ap.add_argument("--vllm-python", default=str(DEFAULT_VLLM_PYTHON), help="python of the vLLM env")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "vllm_parity.json"))
    ap.add_argument("--role", choices=["driver", "ours", "vllm"], default="driver", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--role-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.role != "driver":
        spec = json.loads(Path(args.spec).read_text())
        result = (role_vllm if args.role == "vllm" else role_ours)(spec)
        Path(args.role_out).write_text(json.dumps(result))
        return

    if not Path(args.vllm_python).is_file():
        raise SystemExit(f"no vLLM env at {args.vllm_python}: run `bash bench/vllm_env.sh` first")
    load_start = os.getloadavg()
    sections = [compare(ckpt.resolve(), args) for ckpt in ensure_checkpoints(args)]
    total = sum(s["prompts"] for s in sections)
    equal = sum(s["prompts_equal"] for s in sections)
    print(f"\nall checkpoints: {equal} of {total} prompts with identical token ids; teacher-forced top-1 equal at "
          f"{sum(s['teacher_forced_argmax_equal'] for s in sections)} of "
          f"{sum(s['teacher_forced_positions'] for s in sections)} positions")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "bench/vllm_parity.py", *(argv or sys.argv[1:])]),
                               "vllm_kwargs": vllm_kwargs(args.max_model_len), "max_tokens": args.max_tokens,
                               "ignore_eos": True, "load_average_start": load_start,
                               "load_average_end": os.getloadavg(), "prompts_equal": equal, "prompts": total,
                               "checkpoints": sections}, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
