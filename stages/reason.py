"""Reasoning distillation (black-box): SFT on `<think>...</think><answer>...</answer>` replies from a
stronger model, with the four tag tokens weighted x10 in the loss so the format is learned early.

    python stages/reason.py --init out/dpo --data r1_mix_1024.jsonl
"""
from dataclasses import dataclass

from stages.common import Stage, StageLoss, causal_lm_loss, run_stage, ChatTrainConfig, BUNDLED


@dataclass
class ReasonConfig(ChatTrainConfig):
    # MiniMind's reasoning-distillation defaults.
    data: tuple[str, ...] = (str(BUNDLED / "sample_reason.jsonl"),)
    out: str = "out/reason"
    epochs: int = 1
    batch_size: int = 8
    accumulation_steps: int = 1
    lr: float = 1e-6
    max_seq_len: int = 1024


class Reason(Stage):
    name = "reason"
    data_format = "reason"  # loss_mask carries weight 10 on the tag tokens
    config_cls = ReasonConfig

    # weight(): MiniMind's normalisation, kept: the denominator is the sum of the loss-mask weights, so each
    # tag token counts 10 and every other assistant token 1 (the loss is sum(w * ce) / sum(w) over the step).

    def scored_chars(self, batch, char_counts):
        return None  # weights are not 0/1: nats per character is not defined

    def loss(self, model, batch, helpers=None):
        total, out = causal_lm_loss(model, batch)
        tags = (batch["loss_mask"][:, 1:] > 1).sum()
        return StageLoss(total, out.aux_loss, {"aux_loss": out.aux_loss, "tag_tokens": tags.float()})


if __name__ == "__main__":
    run_stage(Reason())
