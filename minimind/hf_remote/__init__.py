"""Hugging Face remote code for MiniMind MoE checkpoints.

`save_checkpoint` copies configuration_minimind_moe.py and modeling_minimind_moe.py into every MoE checkpoint
directory, and its config.json names them under `auto_map`, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` builds the model from them. The two files
import only torch and transformers (they run from the checkpoint directory, without this package), and nothing
in minimind imports them.
"""
from pathlib import Path

FILES = ("configuration_minimind_moe.py", "modeling_minimind_moe.py")
SOURCE_DIR = Path(__file__).resolve().parent
