"""LoRA fine-tuning: the base model frozen, low-rank adapters on the chosen projections trained.

The output directory holds the merged model (a plain checkpoint) and the adapter alone, in PEFT's format
(adapter_model.safetensors + adapter_config.json): `python -m minimind merge-lora` folds it into any copy of
the base, and `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)` loads it.

    python stages/lora.py --init out/sft --data lora_identity.jsonl
"""
from dataclasses import dataclass, field

from minimind.lora import DEFAULT_TARGETS, apply_lora
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
        # The checkpoint (cluster.checkpoint) writes such a model merged, with its adapter beside it.
        model = super().build_model(cfg)
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        return model


if __name__ == "__main__":
    run_stage(LoRA())
