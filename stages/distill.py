"""White-box knowledge distillation from a frozen teacher (MiniMind2 104M, the `base` preset):
loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) on the assistant tokens.

    python stages/distill.py --preset small --teacher out/sft-base --data sft_mini_512.jsonl
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from minimind.losses import distill_loss
from minimind.model import MiniMind
from stages.common import Stage, StageLoss, load_frozen, run_stage, ChatTrainConfig, BUNDLED


@dataclass
class DistillConfig(ChatTrainConfig):
    data: tuple[str, ...] = (str(BUNDLED / "sample_sft.jsonl"),)
    out: str = "out/distill"
    epochs: int = 6
    batch_size: int = 32
    accumulation_steps: int = 1
    lr: float = 5e-6
    teacher: str = field(default="", metadata={"path": True, "help": "frozen teacher checkpoint directory (required)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the hard-label CE; 1 - alpha goes to KL"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature T of the KL term"})

    def validate(self):
        super().validate()
        if not self.teacher:
            raise ValueError("--teacher is required: the checkpoint directory of the teacher model")
        from minimind.checkpoint import load_config
        load_config(self.teacher)  # fails early, naming the file, if it is not a checkpoint
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError("--alpha must be in [0, 1] and --temperature > 0")


class DistillHelpers(NamedTuple):
    teacher: MiniMind     # frozen
    alpha: float          # weight of the hard-label CE
    temperature: float


class Distill(Stage):
    name = "distill"
    data_format = "chat"
    config_cls = DistillConfig

    def helpers(self, cfg, device) -> DistillHelpers:
        return DistillHelpers(load_frozen(cfg.teacher, device), cfg.alpha, cfg.temperature)

    def loss(self, model, batch, helpers: DistillHelpers):
        ids = batch["input_ids"].long()
        out = model(ids[:, :-1])
        with torch.no_grad():
            teacher_logits = helpers.teacher(ids[:, :-1]).logits
        if teacher_logits.shape[-1] != out.logits.shape[-1]:
            raise ValueError(f"teacher vocab {teacher_logits.shape[-1]} != student vocab {out.logits.shape[-1]}")
        # Per masked token: weight() (the loss-mask sum) is the denominator.
        total, metrics = distill_loss(out.logits, teacher_logits, ids[:, 1:], batch["loss_mask"][:, 1:],
                                      helpers.alpha, helpers.temperature, reduction="sum")
        return StageLoss(total, out.aux_loss, metrics)


if __name__ == "__main__":
    run_stage(Distill())
