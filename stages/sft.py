"""Supervised fine-tuning: ChatML conversations, loss on the assistant turns only.

The 512- and 1024-token runs are configs of this stage:
    python stages/sft.py --init out/pretrain --data sft_mini_512.jsonl --config stages/configs/sft_512.yaml
    python stages/sft.py --init out/sft --data sft_1024.jsonl --config stages/configs/sft_1024.yaml
"""
from dataclasses import dataclass

from stages.common import Stage, run_stage, ChatTrainConfig, BUNDLED


@dataclass
class SFTConfig(ChatTrainConfig):
    # MiniMind's full-SFT defaults.
    data: tuple[str, ...] = (str(BUNDLED / "sample_sft.jsonl"),)
    out: str = "out/sft"
    epochs: int = 2
    batch_size: int = 16
    accumulation_steps: int = 1
    lr: float = 5e-7


class SFT(Stage):
    name = "sft"
    data_format = "chat"
    config_cls = SFTConfig


if __name__ == "__main__":
    run_stage(SFT())
