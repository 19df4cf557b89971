"""Terminal chat with a MiniMind checkpoint, in this process or against a running server.

  python serve/chat.py --model DIR                 load the checkpoint here (no Ray, no HTTP)
  python serve/chat.py --url http://127.0.0.1:8000 talk to `serve/app.py` (API key from $MINIMIND_API_KEY)

Commands: /reset starts a new conversation, /exit (or Ctrl-D) quits. Reasoning (<think>) is shown dimmed.
"""
import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python serve/chat.py`: import the project from its root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

DIM, RESET = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")


def local_replies(args):
    """(reply, close): reply(messages) yields (reasoning, content) pieces, generated in this process."""
    from minimind.generate import SamplingParams
    from serve.engine import EngineConfig, load_engine
    from serve.protocol import ThinkSplitter

    engine = load_engine(args.model, EngineConfig(max_batch=1, max_len=args.max_len), lora=args.lora)

    def reply(messages):
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        room = engine.context_len - len(prompt)
        if room < 1:
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the context; /reset to start over")
        params = SamplingParams(max_new_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        splitter = ThinkSplitter(args.reasoning)
        for delta in engine.stream_sync(prompt, params):
            yield splitter.push(delta.text)
        yield splitter.flush()

    return reply, engine.shutdown  # stop the scheduler thread before exit (torch aborts on a live one)


def remote_replies(args):
    """(reply, close) talking to a running server's /v1/chat/completions."""
    from openai import OpenAI

    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=os.environ.get("MINIMIND_API_KEY", "none"))
    model = client.models.list().data[0].id

    def reply(messages):
        stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                max_tokens=args.max_tokens, temperature=args.temperature,
                                                top_p=args.top_p, seed=args.seed)
        for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                yield (delta.model_extra or {}).get("reasoning_content") or "", delta.content or ""

    return reply, client.close


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="checkpoint directory to load here")
    where.add_argument("--url", help="base URL of a running server")
    p.add_argument("--lora", help="LoRA adapter directory (with --model)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--max-len", type=int, default=2048, help="context length (with --model)")
    p.add_argument("--temperature", type=float, default=0.85)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--reasoning", default="auto", choices=["auto", "on", "off"])
    args = p.parse_args(argv)

    reply, close = local_replies(args) if args.model else remote_replies(args)
    try:
        converse(reply, args.system)
    finally:
        close()


def converse(reply, system_prompt: str):
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(system)
    print("Chat with MiniMind. /reset starts over, /exit quits.", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            messages = list(system)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("minimind> ", end="", flush=True)
        answer = []
        try:
            for reasoning, content in reply(messages):
                if reasoning:
                    print(DIM + reasoning + RESET, end="", flush=True)
                if content:
                    print(content, end="", flush=True)
                    answer.append(content)
        except (ValueError, KeyboardInterrupt) as e:
            print(f"\n[{e or 'interrupted'}]")
            messages.pop()
            continue
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(answer)})


if __name__ == "__main__":
    main()
