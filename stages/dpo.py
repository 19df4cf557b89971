"""Direct Preference Optimisation against a frozen reference model (the SFT checkpoint).

    python stages/dpo.py --init out/sft --data dpo.jsonl          # reference defaults to --init
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from minimind.losses import dpo_loss, sequence_logprob
from minimind.model import MiniMind
from stages.common import Stage, StageLoss, load_frozen, run_stage, ChatTrainConfig, BUNDLED


@dataclass
class DPOConfig(ChatTrainConfig):
    # MiniMind's DPO defaults: a tiny lr, since the policy starts at the reference.
    data: tuple[str, ...] = (str(BUNDLED / "sample_dpo.jsonl"),)
    out: str = "out/dpo"
    epochs: int = 2
    batch_size: int = 4
    accumulation_steps: int = 1
    lr: float = 1e-8
    max_seq_len: int = 1024
    beta: float = field(default=0.1, metadata={"help": "DPO temperature beta"})
    reference: str = field(default="", metadata={"path": True, "help": "frozen reference checkpoint ('' = --init)"})

    def validate(self):
        super().validate()
        if not (self.reference or self.init):
            raise ValueError("DPO needs a reference model: give --init (the SFT checkpoint) or --reference")


class DPOHelpers(NamedTuple):
    reference: MiniMind   # frozen: the policy's log-ratios are measured against it
    beta: float


class DPO(Stage):
    name = "dpo"
    data_format = "dpo"
    config_cls = DPOConfig

    def helpers(self, cfg, device) -> DPOHelpers:
        return DPOHelpers(load_frozen(cfg.reference or cfg.init, device), cfg.beta)

    def _logprobs(self, model, ids, mask):
        out = model(ids[:, :-1])
        return sequence_logprob(out.logits, ids[:, 1:], mask[:, 1:]), out.aux_loss

    def weight(self, batch):
        return torch.tensor(float(batch["chosen_ids"].shape[0]), dtype=torch.float64)  # DPO reduces per pair

    def scored_chars(self, batch, char_counts):
        return None

    def loss(self, model, batch, helpers: DPOHelpers):
        # Chosen and rejected rows go through the model in one batch: (2B, T).
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]]).long()
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        policy, aux = self._logprobs(model, ids, mask)
        with torch.no_grad():
            reference, _ = self._logprobs(helpers.reference, ids, mask)
        b = batch["chosen_ids"].shape[0]
        total, metrics = dpo_loss(policy[:b], policy[b:], reference[:b], reference[b:], helpers.beta, reduction="sum")
        return StageLoss(total, aux, metrics)


if __name__ == "__main__":
    run_stage(DPO())
