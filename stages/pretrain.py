"""Pretraining: next-token prediction on packed text (plus the MoE balancing loss).

    python stages/pretrain.py                       # tiny model, bundled sample, local Ray cluster
    python stages/pretrain.py --preset small --data pretrain_hq.jsonl --profile 4090
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401 (run as a script)
from stages.common import Stage, causal_lm_loss, run_stage


class Pretrain(Stage):
    name = "pretrain"
    data_format = "pretrain"

    def loss(self, model, batch):
        loss, out = causal_lm_loss(model, batch)
        return loss + out.aux_loss, {"aux_loss": out.aux_loss}


if __name__ == "__main__":
    run_stage(Pretrain())
