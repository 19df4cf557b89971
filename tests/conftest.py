"""Shared fixtures: one local Ray cluster for the whole session, the data a fresh clone has (the bundled samples
and the tokenizer trained on them), and the real data beside the checkout for the tests that are about it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.config import BUNDLED_DATA
from cluster.runtime import loopback_env

# Before any test imports ray, and in this process's environment so that the clusters tests start themselves
# (`ray start`, `serve run`, subprocess stages) inherit it too: loopback only, the worker setup hook, the repo
# importable by every worker.
if not os.environ.get("RAY_ADDRESS"):
    loopback_env()

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it lies beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def project_tokenizer(tmp_path_factory) -> Path:
    """The tokenizer of a fresh clone: trained on the bundled sample corpus (2,257 tokens), exactly what a run
    without --tokenizer uses, saved once as a directory."""
    from minimind.__main__ import default_tokenizer
    out = tmp_path_factory.mktemp("project-tokenizer")
    default_tokenizer().save(out)
    return out


@pytest.fixture(scope="session")
def bundled_corpus(tmp_path_factory):
    """`bundled_corpus(copies)`: the bundled pretraining sample (685 texts, ~34k tokens) as one jsonl file,
    `copies` times over, each copy in its own fixed shuffled order, for runs that need more tokens than it has.
    A copy count gives the same file every time (runs that share a tokenised cache rely on it)."""
    import random
    lines = [line for line in (BUNDLED_DATA / "sample_corpus.jsonl").read_text(encoding="utf-8").splitlines() if line]
    made: dict[int, Path] = {}

    def make(copies: int = 1) -> Path:
        if copies not in made:
            rows = []
            for seed in range(copies):
                copy = list(lines)
                if seed:
                    random.Random(seed).shuffle(copy)
                rows += copy
            path = tmp_path_factory.mktemp(f"corpus-x{copies}") / "corpus.jsonl"
            path.write_text("\n".join(rows) + "\n", encoding="utf-8")
            made[copies] = path
        return made[copies]
    return make


@pytest.fixture(scope="session")
def random_adapter():
    """`random_adapter(ckpt, out, seed, rank, targets, std)`: a PEFT-format LoRA adapter for checkpoint `ckpt`
    with random A and B (B ~ N(0, std), as if trained) written to `out`; returns (out, the merged float64 model)."""
    def make(ckpt, out: Path, seed: int, rank: int, targets=("q_proj", "k_proj", "v_proj", "o_proj"), std=0.05):
        import torch

        from minimind.checkpoint import load_model
        from minimind.lora import apply_lora, merge_lora, save_adapter

        model = load_model(ckpt)
        torch.manual_seed(seed)  # A's initialisation too: the same adapter whichever tests ran before
        apply_lora(model, rank=rank, alpha=2.0 * rank, targets=targets)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.data.normal_(0, std)
        out.mkdir(parents=True)
        save_adapter(model, out)
        return out, merge_lora(model).double().eval()
    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every test that needs Ray.

    4 logical CPUs on a 2-core machine: 2 train workers at 1 CPU each would otherwise leave Ray Data no CPU
    and hang (measured: ray.init(num_cpus=2) with 2 workers deadlocks).
    """
    from cluster.runtime import init_ray
    ray = init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
