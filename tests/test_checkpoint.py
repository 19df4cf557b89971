"""Checkpoint directories: Hugging Face compatibility, round trips, MiniMind .pth files, bad input, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimind.checkpoint import (load_checkpoint, load_config, load_minimind_pth, load_model, save_checkpoint)
from minimind.config import PRESETS
from minimind.model import MiniMind

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(project_tokenizer):
    from minimind.tokenizer import Tokenizer
    return Tokenizer.from_dir(project_tokenizer)


def _model(preset="tiny", seed=0):
    torch.manual_seed(seed)
    return MiniMind(PRESETS[preset]).eval()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_transformers_loads_dense_checkpoint_with_same_logits(tmp_path, preset, tokenizer):
    import transformers  # a declared dependency: a missing one must fail, not skip
    model = _model(preset)
    save_checkpoint(model, tmp_path / "ck", tokenizer=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([tokenizer.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。")])
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids).logits).abs().max().item()
    assert diff == 0.0, diff  # "identical logits": measured bit-identical in fp32 (tiny and small)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert hf_tok("你好 world", add_special_tokens=False)["input_ids"] == tokenizer.encode("你好 world")


def test_round_trip_dense_and_moe(tmp_path):
    for preset in ("tiny", "tiny-moe"):
        model = _model(preset, seed=3)
        save_checkpoint(model, tmp_path / preset)
        back = load_model(tmp_path / preset)
        assert back.config == model.config
        for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), k
    raw = json.loads((tmp_path / "tiny-moe" / "config.json").read_text())
    assert raw["model_type"] == "minimind_moe" and raw["minimind"]["num_experts"] == 4
    raw = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["tie_word_embeddings"] and raw["rope_theta"] == 1e6
    files = {p.name for p in (tmp_path / "tiny").iterdir()}
    assert files == {"config.json", "model.safetensors", "generation_config.json"}


def test_bf16_save_loads_back(tmp_path):
    model = _model()
    save_checkpoint(model, tmp_path / "bf", dtype=torch.bfloat16)
    back = load_model(tmp_path / "bf")
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    save_checkpoint(_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path / "ck")


def test_wrong_shape_names_file_and_tensor(tmp_path):
    save_checkpoint(_model("tiny"), tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["minimind"]["intermediate_size"] = raw["intermediate_size"] = 256  # the stored FFN weights are 192 wide
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        load_model(tmp_path / "ck")


def test_truncated_and_corrupt_safetensors(tmp_path):
    save_checkpoint(_model(), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor \S+ is truncated"):
        load_model(tmp_path / "ck")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="model.safetensors: corrupt safetensors header"):
        load_model(tmp_path / "ck")
    weights.write_bytes(b"\x01")
    with pytest.raises(ValueError, match="model.safetensors: truncated"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_config(tmp_path / "ck")


def test_failed_save_leaves_existing_checkpoint_intact(tmp_path):
    good = _model(seed=1)
    save_checkpoint(good, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}

    class BrokenTokenizer:
        def save(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_model(seed=2), tmp_path / "ck", tokenizer=BrokenTokenizer())
    after = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind


def test_original_minimind_pth_files_load(tmp_path):
    model = _model("tiny", seed=4)
    sd = model.state_dict()  # MiniMind2 names equal ours, lm_head included
    torch.save(sd, tmp_path / "minimind2.pth")
    a = load_minimind_pth(tmp_path / "minimind2.pth", PRESETS["tiny"])
    # First-release names: tok_embeddings, layers.N.attention.wq, feed_forward.w1/w2/w3, output.
    legacy = {}
    for k, v in sd.items():
        k = (k.replace("model.embed_tokens.", "tok_embeddings.").replace("model.norm.", "norm.")
             .replace("lm_head.", "output.").replace("model.layers.", "layers.")
             .replace("self_attn.q_proj", "attention.wq").replace("self_attn.k_proj", "attention.wk")
             .replace("self_attn.v_proj", "attention.wv").replace("self_attn.o_proj", "attention.wo")
             .replace("input_layernorm", "attention_norm").replace("post_attention_layernorm", "ffn_norm")
             .replace("mlp.gate_proj", "feed_forward.w1").replace("mlp.up_proj", "feed_forward.w3")
             .replace("mlp.down_proj", "feed_forward.w2"))
        legacy["_orig_mod." + k] = v
    torch.save(legacy, tmp_path / "legacy.pth")
    b = load_minimind_pth(tmp_path / "legacy.pth", "tiny")
    x = torch.randint(0, 6400, (1, 10))
    with torch.no_grad():
        assert torch.equal(a(x).logits, model(x).logits)
        assert torch.equal(b(x).logits, model(x).logits)
    with pytest.raises(ValueError, match=r"legacy\.pth: missing tensors \['model\.layers\.2\."):
        load_minimind_pth(tmp_path / "legacy.pth", "tiny-base")


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "minimind", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_new_info_generate(tmp_path, project_tokenizer, tokenizer):
    out = tmp_path / "ck"
    _cli("new", "--preset", "tiny", "--out", str(out), "--tokenizer", str(project_tokenizer), "--seed", "5")
    info = _cli("info", str(out)).stdout
    assert "preset:     tiny" in info and f"{508_224:,}" in info and "float32" in info
    assert "tokenizer.json" in info and "model.safetensors" in info
    text = _cli("generate", str(out), "--prompt", "床前明月光", "--greedy", "--max-new-tokens", "12").stdout
    # The CLI must print exactly what the library generates from the tokenizer's own encoding.
    from minimind.generate import SamplingParams, generate
    model, tok = load_checkpoint(out)
    ids = generate(model, tok.encode("床前明月光"), SamplingParams.greedy(12, stop_ids=[tok.eos_id]))
    assert text == tok.decode(ids) + "\n"
    chat = _cli("generate", str(out), "--prompt", "你好", "--chat", "--greedy", "--max-new-tokens", "5").stdout
    chat_ids = generate(model, tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True),
                        SamplingParams.greedy(5, stop_ids=[tok.eos_id]))
    assert chat == tok.decode(chat_ids) + "\n"
    bad = _cli("info", str(tmp_path / "missing"), check=False)
    assert bad.returncode == 2 and "missing" in bad.stderr


def test_cli_convert_turns_a_minimind_pth_into_a_checkpoint(tmp_path, project_tokenizer):
    """`python -m minimind convert X.pth --preset P --out D [--tokenizer T]`: D loads with the .pth's exact
    logits, in our loader and in transformers, and carries the tokenizer; a .pth of another size is refused."""
    import transformers
    model = _model("tiny", seed=6)
    torch.save({"_orig_mod." + k: v for k, v in model.state_dict().items()}, tmp_path / "full_sft_64.pth")
    done = _cli("convert", str(tmp_path / "full_sft_64.pth"), "--preset", "tiny", "--out", str(tmp_path / "ck"),
                "--tokenizer", str(project_tokenizer))
    assert f"({model.num_parameters():,} parameters)" in done.stdout
    converted, tok = load_checkpoint(tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("床前明月光，疑是地上霜。")])
    with torch.no_grad():
        assert torch.equal(converted.eval()(ids).logits, model(ids).logits)
        assert torch.equal(hf(ids).logits, model(ids).logits)
    from minimind.tokenizer import Tokenizer
    assert tok.fingerprint() == Tokenizer.from_dir(project_tokenizer).fingerprint()
    wrong = _cli("convert", str(tmp_path / "full_sft_64.pth"), "--preset", "tiny-base", "--out",
                 str(tmp_path / "bad"), check=False)
    assert wrong.returncode != 0 and "full_sft_64.pth: missing tensors" in wrong.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_info_refuses_truncated_weights(tmp_path):
    save_checkpoint(_model(), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    bad = _cli("info", str(tmp_path / "ck"), check=False)
    assert bad.returncode == 2, bad.stdout
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors: tensor" in lines[0] and "truncated" in lines[0]


_MARKER_PAYLOAD = '''
import os, pickle
class Boom:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
with open({path!r}, "wb") as f:
    pickle.dump({{"model.embed_tokens.weight": Boom()}}, f)
'''


def test_cli_info_refuses_pickle_without_unpickling(tmp_path):
    save_checkpoint(_model(), tmp_path / "ck")
    marker = tmp_path / "pwned"
    # A pickle that would create `marker` if anything loaded it, written by a separate process so this test
    # itself never holds the payload class.
    for name in ("pytorch_model.bin", "weights.data"):  # by suffix, and by content alone
        path = tmp_path / "ck" / name
        subprocess.run([sys.executable, "-c", _MARKER_PAYLOAD.format(marker=marker, path=str(path))], check=True)
        bad = _cli("info", str(tmp_path / "ck"), check=False)
        assert bad.returncode == 2 and f"{name}: a pickle file" in bad.stderr, bad.stderr
        assert not marker.exists()
        path.unlink()
    assert _cli("info", str(tmp_path / "ck")).returncode == 0


def test_cli_info_refuses_weights_that_do_not_match_config(tmp_path):
    save_checkpoint(_model("tiny"), tmp_path / "ck")
    save_checkpoint(_model("tiny-moe"), tmp_path / "moe")
    (tmp_path / "ck" / "model.safetensors").write_bytes((tmp_path / "moe" / "model.safetensors").read_bytes())
    bad = _cli("info", str(tmp_path / "ck"), check=False)
    assert bad.returncode == 2 and "model.safetensors: does not match config.json" in bad.stderr, bad.stderr


@pytest.mark.parametrize("field,value", [("hidden_size", 96), ("num_key_value_heads", 1), ("rope_theta", 10000.0),
                                         ("tie_word_embeddings", False), ("model_type", "minimind_moe")])
def test_config_top_level_must_agree_with_minimind_block(tmp_path, field, value):
    save_checkpoint(_model("tiny"), tmp_path / "ck")
    path = tmp_path / "ck" / "config.json"
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"config\.json: top-level {field} is .* \"minimind\" block"):
        load_config(tmp_path / "ck")
    del raw[field]
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"config\.json: top-level {field} is missing"):
        load_config(tmp_path / "ck")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_follow_the_umask_not_0600(tmp_path, tokenizer, umask):
    """A checkpoint on a cluster volume must be readable by whoever the user's umask lets read it."""
    import os
    from minimind.lora import apply_lora, save_adapter
    old = os.umask(umask)
    try:
        save_checkpoint(_model(), tmp_path / "ck", tokenizer=tokenizer)
        model = _model()
        apply_lora(model, rank=2)
        (tmp_path / "adapter").mkdir()
        save_adapter(model, tmp_path / "adapter", {"rank": 2})
    finally:
        os.umask(old)
    for f in (tmp_path / "adapter").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ck").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~umask
