"""Pretraining: next-token prediction on packed text (plus the MoE balancing loss).

With no arguments it trains the tiny preset on the bundled sample (a few minutes on 2 CPUs). MiniMind's
pretrain run (small preset, micro-batch 32 x accumulation 8, seq 512, lr 5e-4, 1 epoch) is a config file:

    python stages/pretrain.py --config stages/configs/pretrain_512.yaml --data pretrain_hq.jsonl --profile 4090
"""
from dataclasses import dataclass

from stages.common import Stage, TrainConfig, run_stage


@dataclass
class PretrainConfig(TrainConfig):
    # Sized for the bundled ~200 KB sample: MiniMind's 32 x 8 rows of 512 would not fill one step.
    batch_size: int = 8
    accumulation_steps: int = 1
    max_seq_len: int = 256
    epochs: int = 3


class Pretrain(Stage):
    name = "pretrain"
    data_format = "pretrain"
    config_cls = PretrainConfig


if __name__ == "__main__":
    run_stage(Pretrain())
