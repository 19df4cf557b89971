"""The loop reduces exactly: one optimizer step's gradient is that of sum(w * loss) / sum(w) over the whole
global batch, however the batch is cut into ranks and micro-batches.

The same 8-row global batch, with deliberately uneven loss masks (rows with 1 scored token beside rows with
60), gives the same gradient in one process with the whole batch, one worker with accumulation 2, 2 DDP
workers, 2 DDP workers with accumulation 2, and 2 DeepSpeed ZeRO-2 workers (real Ray Train workers, gloo,
fp32). Before the loop divided by the step's total weight, each micro-batch's mean was averaged, and these
gradients differed by several percent.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.config import Resolved, TrainConfig
from minimind.checkpoint import save_checkpoint
from minimind.config import get_preset
from minimind.model import MiniMind

SEQ = 64
ROWS = 8
# Scored targets per row: uneven on purpose, and unevenly split between the halves of the batch.
SCORED = (1, 3, 60, 2, 40, 5, 64, 7)


def global_batch(fmt: str) -> dict:
    g = torch.Generator().manual_seed(7)
    vocab = get_preset("tiny").vocab_size

    def rows():
        ids = torch.randint(3, vocab, (ROWS, SEQ + 1), generator=g, dtype=torch.int32)
        mask = torch.zeros(ROWS, SEQ + 1)
        for r, n in enumerate(SCORED):
            mask[r, SEQ + 1 - n:] = 1.0
        return ids, mask
    if fmt == "dpo":
        (c, cm), (r, rm) = rows(), rows()
        rm = rm.flip(0)  # rejected masks uneven in another order
        return {"chosen_ids": c, "chosen_mask": cm, "rejected_ids": r, "rejected_mask": rm,
                "length": torch.full((ROWS,), 2 * (SEQ + 1), dtype=torch.int32)}
    ids, mask = rows()
    if fmt == "pretrain":  # unpacked pretraining: padding after each document, nothing scored there
        mask = mask.flip(1)
    return {"input_ids": ids, "loss_mask": mask, "length": torch.full((ROWS,), SEQ + 1, dtype=torch.int32)}


def stage_and_config(fmt: str, reference: str):
    if fmt == "dpo":
        from stages.dpo import DPO, DPOConfig
        return DPO(), DPOConfig(init=reference, max_seq_len=SEQ, batch_size=1, accumulation_steps=1, lr=1e-3)
    if fmt == "chat":
        from stages.sft import SFT, SFTConfig
        return SFT(), SFTConfig(init=reference, max_seq_len=SEQ, batch_size=1, accumulation_steps=1, lr=1e-3)
    from stages.pretrain import Pretrain
    return Pretrain(), TrainConfig(preset="tiny", max_seq_len=SEQ, batch_size=1, accumulation_steps=1, lr=1e-3)


def step_gradient(fmt: str, reference: str, rank: int, world: int, accumulation: int, zero_stage: int,
                  out: str | None) -> dict[str, torch.Tensor]:
    """Build the stage's model and strategy as the loop does, run one step's backward on this rank's share of
    the global batch, and return (rank 0: also save) the full reduced gradient."""
    from cluster.loop import accumulate_gradients, build_strategy, lr_schedule, param_groups
    stage, cfg = stage_and_config(fmt, reference)
    per_micro = ROWS // (world * accumulation)
    cfg = cfg.replace(batch_size=per_micro, accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = stage.build_model(cfg)
    helpers = stage.helpers(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(10, 0.0, 0.1))
    res = Resolved(use_gpu=False, num_workers=world, zero_stage=zero_stage, dtype="float32", backend="gloo")
    strategy = build_strategy(cfg, res, model, optimizer, scheduler, torch.device("cpu"))
    batch = global_batch(fmt)
    mine = {k: v[rank * ROWS // world:(rank + 1) * ROWS // world] for k, v in batch.items()}
    micro = [{k: v[i * per_micro:(i + 1) * per_micro] for k, v in mine.items()} for i in range(accumulation)]
    accumulate_gradients(stage, strategy, micro, SEQ, world, torch.device("cpu"), "float32", helpers)
    if zero_stage:
        from deepspeed.utils import safe_get_full_grad
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in strategy.module.named_parameters()}
    else:
        grads = {n: p.grad.detach().clone() for n, p in strategy.module.named_parameters()}
    if out and rank == 0:
        save_file(grads, out)
    return grads


FORMATS = ("pretrain", "chat", "dpo")
RAY_RUNS = {"2 DDP workers": (1, 0), "2 DDP workers, accumulation 2": (2, 0), "2 ZeRO-2 workers": (1, 2)}


def _ray_worker(config: dict):
    # Every format and strategy in one worker group: one TorchTrainer start (~20 s here) instead of nine.
    import ray.train
    ctx = ray.train.get_context()
    for fmt in FORMATS:
        for name, (accumulation, zero_stage) in RAY_RUNS.items():
            step_gradient(fmt, config["reference"], ctx.get_world_rank(), ctx.get_world_size(), accumulation,
                          zero_stage, config["out"].format(fmt=fmt, run=name.replace(" ", "_").replace(",", "")))


@pytest.fixture(scope="module")
def ray_gradients(ray_cluster, reference_checkpoint, tmp_path_factory) -> dict:
    """{(format, run name): gradient} from real 2-worker Ray Train runs (gloo, fp32)."""
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    tmp = tmp_path_factory.mktemp("gradients")
    out = str(tmp / "{fmt}-{run}.safetensors")
    TorchTrainer(_ray_worker, train_loop_config={"reference": reference_checkpoint, "out": out},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="gradients", storage_path=str(tmp / "ray"))).fit()
    return {(fmt, name): load_file(out.format(fmt=fmt, run=name.replace(" ", "_").replace(",", "")))
            for fmt in FORMATS for name in RAY_RUNS}


def relative_difference(a: dict, b: dict) -> float:
    diff = torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a))
    return float(diff / torch.sqrt(sum((b[k].double() ** 2).sum() for k in b)))


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("reference") / "tiny"
    save_checkpoint(MiniMind(get_preset("tiny")), directory)
    return str(directory)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradient_equal_across_world_sizes_and_accumulation(ray_gradients, reference_checkpoint, fmt):
    whole = step_gradient(fmt, reference_checkpoint, 0, 1, 1, 0, None)
    runs = {"1 worker, accumulation 2": step_gradient(fmt, reference_checkpoint, 0, 1, 2, 0, None),
            **{name: ray_gradients[fmt, name] for name in RAY_RUNS}}
    assert float(sum((g ** 2).sum() for g in whole.values())) > 0
    for name, grads in runs.items():
        assert grads.keys() == whole.keys(), name
        assert relative_difference(grads, whole) < 1e-6, f"{name}: {relative_difference(grads, whole):.2e}"


def test_whole_batch_gradient_is_the_token_weighted_mean(reference_checkpoint):
    """The one-process reference itself: equal to autograd of sum(w * ce) / sum(w) written out by hand, and
    not to the mean of the two halves' means (what the loop computed before)."""
    from minimind.losses import token_logprobs
    grads = step_gradient("chat", reference_checkpoint, 0, 1, 1, 0, None)
    batch = global_batch("chat")

    def grad_of(loss_fn):
        from minimind.checkpoint import load_model
        model = load_model(reference_checkpoint, dtype=torch.float32)
        model.zero_grad()
        loss_fn(model).backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def weighted(model, rows=slice(None)):
        ids, mask = batch["input_ids"][rows].long(), batch["loss_mask"][rows, 1:]
        ce = -token_logprobs(model(ids[:, :-1]).logits, ids[:, 1:])
        return (ce * mask).sum() / mask.sum()

    assert relative_difference(grads, grad_of(weighted)) < 1e-6
    mean_of_means = grad_of(lambda m: (weighted(m, slice(0, 4)) + weighted(m, slice(4, 8))) / 2)
    assert relative_difference(grads, mean_of_means) > 1e-2


def test_weight_decay_skips_norm_gains():
    from cluster.loop import param_groups
    model = MiniMind(get_preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["params"]
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() < 2}
    assert any("norm" in names[id(p)] for p in no_decay["params"])
