"""Terminal chat with a MiniMind checkpoint, in this process or against a running server.

  python serve/chat.py --model DIR                 load the checkpoint here (no Ray, no HTTP)
  python serve/chat.py --url http://127.0.0.1:8000 talk to `serve/app.py` (API key from $MINIMIND_API_KEY)

Commands: /reset starts a new conversation, /exit (or Ctrl-D) quits. Reasoning (<think>) is shown dimmed.
"""
import os
import sys
from dataclasses import dataclass, field

DIM, RESET = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")


@dataclass
class ChatConfig:
    model: str = field(default="", metadata={"help": "checkpoint directory to load here (this or --url)"})
    url: str = field(default="", metadata={"help": "base URL of a running server (this or --model)"})
    lora: str = field(default="", metadata={"help": "LoRA adapter directory (with --model)"})
    system: str = field(default="", metadata={"help": "system prompt"})
    max_tokens: int = field(default=512, metadata={"help": "most tokens per reply"})
    max_len: int = field(default=2048, metadata={"help": "context length (with --model)"})
    temperature: float = field(default=0.85, metadata={"help": "0: greedy"})
    top_p: float = field(default=0.85, metadata={"help": "nucleus sampling mass"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed"})
    reasoning: str = field(default="auto", metadata={"help": "show <think>...</think> apart from the reply",
                                                      "choices": ["auto", "on", "off"]})

    def __post_init__(self):
        if bool(self.model) == bool(self.url):
            raise ValueError("give exactly one of --model DIR (load here) or --url URL (a running server)")


def local_replies(args):
    """(reply, close): reply(messages) yields (reasoning, content) pieces, generated in this process."""
    from minimind.generate import SamplingParams
    from serve.engine import EngineConfig, load_engine
    from serve.protocol import ThinkSplitter

    engine = load_engine(args.model, EngineConfig(max_batch=1, max_len=args.max_len), lora=args.lora or None)

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
    from minimind.configcli import parse_config

    try:
        args = parse_config(ChatConfig, argv, prog="python serve/chat.py", description=__doc__.split("\n")[0])
    except ValueError as e:
        sys.exit(f"serve/chat.py: {e}")
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
