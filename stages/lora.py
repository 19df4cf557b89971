"""LoRA fine-tuning: the base model frozen, low-rank adapters on the chosen projections trained.

The output directory holds the merged model (a plain checkpoint) and the adapter alone, in PEFT's format
(adapter_model.safetensors + adapter_config.json): `python -m minimind merge-lora` folds it into any copy of
the base, and `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)` loads it.

    python stages/lora.py --init out/sft --data lora_identity.jsonl
"""
import copy
from dataclasses import dataclass, field
from pathlib import Path


from minimind.checkpoint import read_weights
from minimind.lora import (ADAPTER_WEIGHTS, DEFAULT_TARGETS, apply_lora, load_lora_state_dict, merge_lora,
                           save_adapter)
from stages.common import Stage, run_stage, ChatTrainConfig, BUNDLED


@dataclass
class LoRAConfig(ChatTrainConfig):
    # MiniMind's LoRA defaults.
    data: tuple[str, ...] = (str(BUNDLED / "sample_sft.jsonl"),)
    out: str = "out/lora"
    epochs: int = 10
    batch_size: int = 32
    accumulation_steps: int = 1
    lr: float = 1e-4
    lora_rank: int = field(default=8, metadata={"help": "adapter rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "adapter scale numerator: W + alpha/r * BA"})
    lora_targets: tuple[str, ...] = field(default=DEFAULT_TARGETS,
                                          metadata={"help": "names of the linear layers to adapt"})


class LoRA(Stage):
    name = "lora"
    data_format = "chat"
    config_cls = LoRAConfig

    def build_model(self, cfg):
        model = super().build_model(cfg)
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        self.adapter_config = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                               "targets": list(cfg.lora_targets), "base": cfg.init}
        return model

    def export(self, module, weights):
        return merge_lora(copy.deepcopy(module).cpu().float())

    def save_extra(self, module, directory: Path):
        save_adapter(module, directory, self.adapter_config)

    def restore(self, model, directory: Path):
        path = directory / ADAPTER_WEIGHTS
        load_lora_state_dict(model, read_weights(path), path)


if __name__ == "__main__":
    run_stage(LoRA())
