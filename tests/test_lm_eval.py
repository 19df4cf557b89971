"""Our checkpoints under the real lm-eval harness (`lm_eval --model hf`), on the task the project ships
(evals/lm_eval/minimind_sample.yaml), agreeing with our evaluate stage where both measure the same thing: the
log-likelihood of each pretraining document, packed training's view (<|endoftext|> text <|endoftext|>)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import BUNDLED_DATA

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = 24


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, project_tokenizer):
    import torch

    from minimind.checkpoint import save_checkpoint
    from minimind.config import get_preset
    from minimind.model import MiniMind
    from minimind.tokenizer import Tokenizer
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lm-eval") / "tiny"
    save_checkpoint(MiniMind(get_preset("tiny")), out, tokenizer=Tokenizer.from_dir(project_tokenizer))
    return out


def test_lm_eval_log_likelihoods_equal_the_evaluate_stage(tiny_checkpoint, tmp_path):
    from cluster.evaluate import EvalConfig, evaluate
    lm_eval = Path(sys.executable).with_name("lm_eval")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "lm-eval"
    # The shipped task, run from the project root as the README says (its data_files path is relative).
    run = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args",
         f"pretrained={tiny_checkpoint},dtype=float32,prefix_token_id=0", "--include_path", "evals/lm_eval",
         "--tasks", "minimind_sample", "--device", "cpu", "--batch_size", "8", "--limit", str(DOCS),
         "--log_samples", "--output_path", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for f in out.rglob("samples_minimind_sample_*.jsonl")
               for line in f.read_text(encoding="utf-8").splitlines()]
    results = json.loads(next(out.rglob("results_*.json")).read_text(encoding="utf-8"))
    assert len(samples) == DOCS
    theirs = {s["doc_id"]: -float(s["filtered_resps"][0]) for s in samples}   # nats per document

    # The same documents through our evaluate stage (in this process, no Ray: the same numbers as with it),
    # with lm-eval's context length (the model's 2048) so long documents see the same context on both sides.
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join((BUNDLED_DATA / "sample_corpus.jsonl").read_text(encoding="utf-8")
                            .splitlines(keepends=True)[:DOCS]), encoding="utf-8")
    report = evaluate(EvalConfig(model=str(tiny_checkpoint), data=(str(docs),), format="pretrain",
                                 max_seq_len=2048, ray=False))
    ours = {d["line"] - 1: d["nats"] for d in report.documents}
    assert sorted(ours) == sorted(theirs)
    worst = max(abs(ours[i] - theirs[i]) / ours[i] for i in ours)
    # Measured: 1.4e-7 relative (lm-eval pads documents into batches of 8, we score each alone).
    assert worst < 1e-5, {i: (ours[i], theirs[i]) for i in ours}
    # lm-eval's bits per byte is the same total over the documents' UTF-8 bytes (its target text carries the
    # appended end token's 13 characters, which our count, by token characters, does not).
    import math
    nbytes = sum(len(s["target"].encode("utf-8")) for s in samples)
    bpb = results["results"]["minimind_sample"]["bits_per_byte,none"]
    assert bpb == pytest.approx(sum(ours.values()) / nbytes / math.log(2), rel=1e-5)
