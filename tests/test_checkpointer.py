"""The checkpoint container (`cluster.checkpoint`): one save holds the model, optimizer, LR scheduler, train
state and data position, and a load puts each back; the inference export (a LoRA model merged, its adapter
beside it) depends on the model alone; a stage keeps no state of the run."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from cluster.checkpoint import Checkpointer, ModelWeights, OptimizerState, TrainState
from cluster.publish import verify_checkpoint
from cluster.strategy import Plain
from minimind.checkpoint import load_model, save_checkpoint
from minimind.config import PRESETS
from minimind.lora import apply_lora, lora_state_dict, merge_lora
from minimind.model import MiniMind


def lora_run(seed: int):
    """A tiny LoRA model (the same base every time; adapters initialised by `seed`), its optimizer and
    schedule, wrapped as the loop wraps them."""
    torch.manual_seed(0)
    model = MiniMind(PRESETS["tiny"])
    torch.manual_seed(seed)
    apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, Plain(model, optimizer, scheduler, 1.0, 1, torch.device("cpu"))


def parts(strategy, state) -> Checkpointer:
    return Checkpointer(model=ModelWeights(strategy.module, strategy.full_state_dict, base="/base"),
                        optimizer=OptimizerState(strategy), train_state=state)


def take_steps(strategy, steps: int):
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        logits = strategy.model(ids[:, :-1]).logits
        strategy.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))
        strategy.step()
    return ids


def test_one_save_restores_model_optimizer_schedule_and_position(tmp_path):
    model, strategy = lora_run(seed=1)
    ids = take_steps(strategy, 3)
    state = TrainState(step=3, micro_batches=3, tokens=96, restored_from=[], log=[{"step": 3, "loss": 1.5}])
    parts(strategy, state).save(tmp_path / "ckpt", rank=0)
    ckpt = tmp_path / "ckpt"
    assert {"model/config.json", "model/model.safetensors", "model/adapter_model.safetensors",
            "model/adapter_config.json", "trainer_state.json", "metrics.jsonl", "optimizer.pt"} <= set(
        verify_checkpoint(ckpt))
    # model/ is for inference: the merged model, with the adapter (naming its base) beside it.
    with torch.no_grad():
        assert torch.equal(load_model(ckpt / "model").eval()(ids).logits,
                           merge_lora(copy.deepcopy(model)).eval()(ids).logits)
    assert json.loads((ckpt / "model" / "adapter_config.json").read_text())["base_model_name_or_path"] == "/base"

    fresh, fresh_strategy = lora_run(seed=2)  # other adapter init, optimizer and schedule at step 0
    restored = TrainState()
    ModelWeights(fresh).load(ckpt)  # before wrapping, as the loop does
    parts(fresh_strategy, restored).load(ckpt, "optimizer", "train_state")
    assert restored == state
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(fresh).values(), lora_state_dict(model).values()))
    assert fresh_strategy.scheduler.last_epoch == strategy.scheduler.last_epoch == 3
    for a, b in zip(fresh_strategy.optimizer.state.values(), strategy.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # Both go on identically from here.
    take_steps(strategy, 1)
    take_steps(fresh_strategy, 1)
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(fresh).values(), lora_state_dict(model).values()))


def test_a_plain_model_exports_without_adapter_and_saving_leaves_the_rng_alone(tmp_path):
    torch.manual_seed(0)
    model = MiniMind(PRESETS["tiny"])
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    Checkpointer(model=ModelWeights(model)).save(tmp_path, rank=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the export built a model without drawing
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    again = load_model(tmp_path / "model")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_rank_above_zero_writes_no_shared_file(tmp_path):
    model, strategy = lora_run(seed=1)
    parts(strategy, TrainState(step=1)).save(tmp_path, rank=1)
    assert list(tmp_path.iterdir()) == []


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(KeyError, match="no checkpoint part named"):
        Checkpointer(train_state=TrainState()).load(tmp_path, "optimiser")


def test_stages_keep_no_state_of_the_run(tmp_path):
    """The frozen helpers come back from `helpers()` and go into every `loss` call; the stage object holds
    nothing, so one object can run any number of runs (and is pickled to workers empty)."""
    from stages.distill import Distill, DistillConfig
    from stages.dpo import DPO, DPOConfig
    from stages.lora import LoRA, LoRAConfig
    torch.manual_seed(0)
    save_checkpoint(MiniMind(PRESETS["tiny"]), tmp_path / "base")
    base = str(tmp_path / "base")
    rows = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 17))
    mask = torch.ones(2, 17)
    dpo_batch = {"chosen_ids": rows, "rejected_ids": rows.flip(1), "chosen_mask": mask, "rejected_mask": mask}
    lm_batch = {"input_ids": rows, "loss_mask": mask}
    for stage, cfg, batch in [(DPO(), DPOConfig(init=base), dpo_batch),
                              (Distill(), DistillConfig(init=base, teacher=base), lm_batch),
                              (LoRA(), LoRAConfig(init=base), lm_batch)]:
        model = stage.build_model(cfg)
        helpers = stage.helpers(cfg, torch.device("cpu"))
        out = stage.loss(model, batch, helpers)
        assert torch.isfinite(out.total)
        assert vars(stage) == {}, f"{stage.name} keeps {sorted(vars(stage))}"
