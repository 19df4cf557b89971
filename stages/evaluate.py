"""Evaluate a checkpoint on held-out documents: loss, perplexity, bits per character, and per format the
assistant-only loss (chat), preference accuracy and margin against a reference (dpo) and the share of
well-formed greedy replies (reason). Scored on Ray Data actors; --no-ray gives the same numbers in process.

    python stages/evaluate.py --model out/pretrain --data val.jsonl --out report.json
    python stages/evaluate.py --model out/sft --data sft_val.jsonl --format chat
    python stages/evaluate.py --model out/dpo --reference out/sft --data dpo_val.jsonl --format dpo
    python stages/evaluate.py --model out/reason --data r1_val.jsonl --format reason --generate 32
"""
import sys

from cluster.evaluate import EvalConfig, evaluate, format_table
from minimind.configcli import parse_config


def main(argv=None):
    cfg = parse_config(EvalConfig, argv, description=__doc__, prog="stages/evaluate.py")
    try:
        report = evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(report.summary), flush=True)
    return report


if __name__ == "__main__":
    main()
