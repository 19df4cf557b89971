"""Our files in the Hugging Face stack: LoRA adapters load with PEFT, MoE checkpoints with transformers' remote code.

No Ray. Measured on CPU, fp32 (tiny presets): PeftModel over our adapter vs our merged model 4.8e-7 max abs logit
difference (vs our unmerged LoRA model: 0.0); MoE remote code vs MiniMind.forward 0.0.
"""
import copy
import json

import pytest
import torch

from minimind.checkpoint import load_model, save_checkpoint, verify_checkpoint
from minimind.config import PRESETS
from minimind.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, lora_state_dict, merge_adapter,
                           merge_lora)
from minimind.model import MiniMind

TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")  # attention and MLP projections


@pytest.fixture(scope="module")
def tokenizer(project_tokenizer):
    from minimind.tokenizer import Tokenizer
    return Tokenizer.from_dir(project_tokenizer)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor([tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。")])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "base"
    save_checkpoint(MiniMind(PRESETS["tiny"]), out, tokenizer=tokenizer)
    return out


def _trained_lora(base_dir, rank=4, alpha=8.0, targets=TARGETS, seed=1):
    """The base with LoRA applied and B drawn non-zero, as after training (a zero B would make any loader pass)."""
    model = load_model(base_dir).eval()
    torch.manual_seed(seed)  # A's random init too
    apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def adapter(base_dir, tmp_path_factory):
    """(adapter directory as the LoRA stage writes it, our merged model)."""
    from cluster.checkpoint import ModelWeights
    model = _trained_lora(base_dir)
    checkpoint = tmp_path_factory.mktemp("hf") / "checkpoint"
    checkpoint.mkdir()
    # Written as a LoRA run's checkpoint writes it: the merged model with the adapter beside it in model/.
    ModelWeights(model, base=str(base_dir)).save(checkpoint, rank=0)
    return checkpoint / "model", merge_lora(copy.deepcopy(model)).eval()


def test_adapter_files_are_in_peft_format(adapter, base_dir):
    out, _ = adapter
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["bias"]) == (4, 8, 0.0, "none")
    assert sorted(cfg["target_modules"]) == sorted(TARGETS) and not cfg["use_rslora"] and not cfg["fan_in_fan_out"]
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["inference_mode"] is True
    from peft import LoraConfig
    LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})  # every field is one PEFT knows
    from safetensors import safe_open
    with safe_open(str(out / ADAPTER_WEIGHTS), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    c = PRESETS["tiny"]
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, c.hidden_size)
    assert shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] == (c.num_kv_heads * c.head_dim, 4)
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] == (4, c.intermediate_size)
    assert len(shapes) == 2 * len(TARGETS) * c.num_layers


def test_peft_loads_our_adapter_with_our_merged_logits(adapter, base_dir, ids):
    import transformers
    from peft import PeftModel
    out, merged = adapter
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, out).eval()
        got, want = peft_model(ids).logits, merged(ids).logits
        assert (got - before).abs().max().item() > 1e-2  # the adapter changes the output
        diff = (got - want).abs().max().item()
        assert diff < 1e-5, diff  # measured 4.8e-7: PEFT adds B(A x) at run time, we fold it into W
        # PEFT's own merge gives our merged weights.
        folded = peft_model.merge_and_unload()
        assert torch.equal(folded(ids).logits, want)


def test_merge_lora_cli_on_peft_adapter(adapter, base_dir, ids, tmp_path):
    from minimind.__main__ import main as minimind_cli
    out, merged = adapter
    assert minimind_cli(["merge-lora", str(base_dir), str(out), "--out", str(tmp_path / "merged")]) == 0
    again = load_model(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, merged(ids).logits)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_lora_stage_resumes_from_peft_named_weights(adapter, base_dir, ids):
    from cluster.checkpoint import ModelWeights
    out, merged = adapter
    model = load_model(base_dir).eval()
    apply_lora(model, rank=4, alpha=8.0, targets=TARGETS)
    ModelWeights(model).load(out.parent)  # what a resumed LoRA run does with its checkpoint
    with torch.no_grad():
        assert torch.equal(merge_lora(model)(ids).logits, merged(ids).logits)


def test_earlier_adapter_format_still_merges(adapter, base_dir, ids, tmp_path):
    """{"rank", "alpha", "targets"} and tensors under our names: what the toolkit wrote before PEFT's format."""
    from safetensors.torch import save_file
    _, merged = adapter
    model = _trained_lora(base_dir)
    save_file(lora_state_dict(model), str(tmp_path / ADAPTER_WEIGHTS))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"rank": 4, "alpha": 8.0, "targets": list(TARGETS)}))
    with torch.no_grad():
        assert torch.equal(merge_adapter(load_model(base_dir), tmp_path).eval()(ids).logits, merged(ids).logits)


def test_adapter_trained_by_peft_merges(base_dir, ids, tmp_path):
    """An adapter PEFT itself saved (its own config fields, peft_version and all) folds into our model."""
    import transformers
    from peft import LoraConfig, get_peft_model
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"],
                                                 lora_dropout=0.1, task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(ids).logits
        got = merge_adapter(load_model(base_dir), tmp_path).eval()(ids).logits
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("field,value", [("use_dora", True), ("use_rslora", True), ("bias", "all"),
                                         ("target_modules", ".*proj"), ("peft_type", "IA3")])
def test_adapter_options_we_cannot_merge_are_refused(adapter, base_dir, tmp_path, field, value):
    out, _ = adapter
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    cfg[field] = value
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    (tmp_path / ADAPTER_WEIGHTS).write_bytes((out / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match=field):
        merge_adapter(load_model(base_dir), tmp_path)


# ---------------------------------------------------------------------------------------------- MoE checkpoints

@pytest.fixture(scope="module")
def moe(tmp_path_factory, tokenizer):
    """A tiny-moe checkpoint (seed 0). The linear weights are redrawn at std 0.3: at the init's std 0.02 the tied
    embedding dominates and greedy decoding repeats the prompt's last token, which would prove little."""
    torch.manual_seed(0)
    model = MiniMind(PRESETS["tiny-moe"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "embed" not in name:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("hf") / "moe"
    save_checkpoint(model, out, tokenizer=tokenizer)
    return out, model


@pytest.fixture(scope="module")
def hf_moe(moe):
    import transformers
    out, _ = moe
    return transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()


def test_moe_checkpoint_carries_remote_code(moe, capsys):
    out, model = moe
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "minimind_moe" and raw["architectures"] == ["MiniMindMoEForCausalLM"]
    assert raw["auto_map"] == {"AutoConfig": "configuration_minimind_moe.MiniMindMoEConfig",
                               "AutoModelForCausalLM": "modeling_minimind_moe.MiniMindMoEForCausalLM"}
    assert (raw["num_experts"], raw["num_experts_per_tok"], raw["num_shared_experts"]) == (4, 2, 1)
    assert {"configuration_minimind_moe.py", "modeling_minimind_moe.py"} <= {p.name for p in out.iterdir()}
    assert verify_checkpoint(out) == model.config  # .py files are not pickles; our loader ignores them
    from minimind.__main__ import main as minimind_cli
    assert minimind_cli(["info", str(out)]) == 0
    assert "modeling_minimind_moe.py" in capsys.readouterr().out
    back = load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_transformers_loads_moe_checkpoint_with_same_logits(moe, hf_moe, ids):
    _, model = moe
    assert type(hf_moe).__name__ == "MiniMindMoEForCausalLM"
    assert hf_moe.lm_head.weight.data_ptr() == hf_moe.model.embed_tokens.weight.data_ptr()  # tied
    batch = torch.cat([ids, ids.flip(1)])
    with torch.no_grad():
        diff = (hf_moe(batch, use_cache=False).logits - model(batch).logits).abs().max().item()
    assert diff < 1e-5, diff  # measured 0.0


def test_moe_greedy_generate_with_cache_matches(moe, hf_moe, ids):
    from minimind.generate import SamplingParams, generate
    _, model = moe
    prompts = [ids[0, :12].tolist(), ids[0, 12:18].tolist()]
    want = [generate(model, p, SamplingParams.greedy(16)) for p in prompts]
    assert len(set(want[0])) > 4  # a real decode, not one token repeated
    with torch.no_grad():
        got = hf_moe.generate(torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False, use_cache=True,
                              eos_token_id=None)
        assert got[0, 12:].tolist() == want[0]
        # Two prompts of different lengths, left-padded: position ids and the padding mask come from generate.
        pad = len(prompts[0]) - len(prompts[1])
        batch = torch.tensor([prompts[0], [0] * pad + prompts[1]])
        mask = torch.tensor([[1] * len(prompts[0]), [0] * pad + [1] * len(prompts[1])])
        got = hf_moe.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert got[0, 12:].tolist() == want[0] and got[1, 12:].tolist() == want[1]


def test_dense_checkpoint_has_no_remote_code(base_dir):
    raw = json.loads((base_dir / "config.json").read_text())
    assert raw["model_type"] == "llama" and "auto_map" not in raw and "num_experts" not in raw
    assert not list(base_dir.glob("*.py"))


def test_moe_top_level_fields_must_agree_with_minimind_block(moe, tmp_path):
    """transformers builds the MoE from the top-level fields: one that disagrees with ours is refused."""
    import shutil
    from minimind.checkpoint import load_config
    out, _ = moe
    shutil.copytree(out, tmp_path / "ck")
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    raw["num_experts_per_tok"] = 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="top-level num_experts_per_tok is 1"):
        load_config(tmp_path / "ck")
