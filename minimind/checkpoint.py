"""Checkpoint directories in the Hugging Face layout, and MiniMind's original `.pth` state dicts.

A checkpoint directory holds:
  config.json             Llama config for dense models (`model_type: llama`, tied embeddings, rope theta),
                          `model_type: minimind_moe` for MoE models, whose `auto_map` names the remote code
                          below; both carry our full `ModelConfig` under the key "minimind".
  configuration_minimind_moe.py, modeling_minimind_moe.py
                          MoE only: the model in transformers' terms (copied from minimind/hf_remote), so
                          `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` reads the checkpoint.
  model.safetensors       weights; the tied LM head is stored once, as `model.embed_tokens.weight`.
  generation_config.json  bos/eos/pad ids and default sampling.
  tokenizer.json, tokenizer_config.json   when a tokenizer is given.

Saves write into a temporary sibling directory and swap it into place, so a failed save never damages
an existing checkpoint. Loads check every tensor's presence and shape and name the file and tensor on error.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, PRESETS
from .model import MiniMind
from .tokenizer import default_file_mode

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# MoE checkpoints carry their transformers classes as remote code (minimind/hf_remote).
MOE_AUTO_MAP = {"AutoConfig": "configuration_minimind_moe.MiniMindMoEConfig",
                "AutoModelForCausalLM": "modeling_minimind_moe.MiniMindMoEForCausalLM"}


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    out = {
        "architectures": ["MiniMindMoEForCausalLM" if cfg.is_moe else "LlamaForCausalLM"],
        "model_type": "minimind_moe" if cfg.is_moe else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "minimind": {"preset": cfg.preset_name(), **cfg.to_dict()},
    }
    if cfg.is_moe:
        out.update({
            "auto_map": dict(MOE_AUTO_MAP),
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "num_shared_experts": cfg.num_shared_experts,
            "norm_topk_prob": cfg.norm_topk_prob,
            "aux_loss_alpha": cfg.aux_loss_alpha,
            "use_cache": True,
        })
    return out


def generation_config() -> dict:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
            "do_sample": True, "temperature": 0.85, "top_p": 0.85, "max_new_tokens": 512}


def model_state_dict(model: MiniMind) -> dict[str, torch.Tensor]:
    """Weights as stored on disk: tied head dropped, contiguous, detached."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_checkpoint(model: MiniMind, out_dir, tokenizer=None, dtype: torch.dtype | None = None,
                    extra_files: dict[str, object] | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a checkpoint directory, atomically replacing `out_dir`.

    extra_files maps file names to JSON-serialisable objects written beside the weights (e.g. a
    training-state summary).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        dtype = dtype or model.lm_head.weight.dtype
        sd = {k: v.to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype)
              for k, v in model_state_dict(model).items()}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / CONFIG, hf_config(model.config, dtype))
        _write_json(tmp / GENERATION_CONFIG, generation_config())
        if model.config.is_moe:
            from .hf_remote import FILES, SOURCE_DIR
            for name in FILES:
                shutil.copyfile(SOURCE_DIR / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, obj in (extra_files or {}).items():
            _write_json(tmp / name, obj)
        mode = default_file_mode()  # safetensors writes 0600; a shared volume needs what the umask allows
        for f in tmp.iterdir():
            f.chmod(mode)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path):
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# Top-level fields that transformers reads; each must say what our own "minimind" block says, or transformers
# builds a different model than ours (and rejects the weights, or worse, loads them into the wrong shape).
HF_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
             "rope_theta", "tie_word_embeddings")
# The MoE fields the remote code reads; a MoE checkpoint written before it carried remote code lacks them.
MOE_HF_FIELDS = ("num_experts", "num_experts_per_tok", "num_shared_experts", "norm_topk_prob")


def load_config(ckpt_dir) -> ModelConfig:
    path = Path(ckpt_dir) / CONFIG
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a checkpoint directory?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if "minimind" in raw:
        fields = {k: v for k, v in raw["minimind"].items() if k != "preset"}
        cfg = ModelConfig.from_dict(fields)
        _check_hf_fields_agree(raw, cfg, path)
        return cfg
    if raw.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not a dense Llama config")
    return ModelConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"], num_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        intermediate_size=raw["intermediate_size"], rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=raw.get("rope_theta", raw.get("rope_parameters", {}).get("rope_theta", 1e6)),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        tie_word_embeddings=raw.get("tie_word_embeddings", True))


def _check_hf_fields_agree(raw: dict, cfg: ModelConfig, path: Path) -> None:
    want = hf_config(cfg, torch.float32)
    for key in HF_FIELDS:
        if key not in raw:
            raise ValueError(f"{path}: top-level {key} is missing (the \"minimind\" block implies {want[key]!r})")
        if raw[key] != want[key]:
            raise ValueError(f"{path}: top-level {key} is {raw[key]!r} but the \"minimind\" block implies "
                             f"{want[key]!r}; the two must agree (transformers reads the top level)")
    for key in MOE_HF_FIELDS if cfg.is_moe else ():
        if key in raw and raw[key] != want[key]:
            raise ValueError(f"{path}: top-level {key} is {raw[key]!r} but the \"minimind\" block implies "
                             f"{want[key]!r}; the two must agree (transformers reads the top level)")
    theta = raw.get("rope_parameters", {}).get("rope_theta", cfg.rope_theta)
    if theta != cfg.rope_theta:
        raise ValueError(f"{path}: rope_parameters.rope_theta is {theta!r} but the \"minimind\" block says "
                         f"{cfg.rope_theta!r}; the two must agree")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors(f, size: int, name) -> dict:
    """Validate a safetensors file's header and every tensor's byte range, reading from the open binary file
    `f` of `size` bytes; `name` goes into the error, so a truncated file names the tensor it cut. Returns the
    header (tensor name -> dtype, shape, data_offsets). Works on any file-like object (cluster.publish checks
    checkpoints on remote storage with it)."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{name}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
        raise ValueError(f"{name}: truncated or corrupt safetensors header ({n} header bytes, file {size})")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{name}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{name}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{name}: corrupt safetensors header entry for tensor {tensor} ({e!r})") from e
        if end > data:
            raise ValueError(f"{name}: tensor {tensor} is truncated (needs bytes up to {end}, file has {data})")
        if width is not None and end - begin != numel * width:
            raise ValueError(f"{name}: tensor {tensor} spans {end - begin} bytes, but {info['dtype']} "
                             f"{info['shape']} needs {numel * width}")
    return header


def _check_safetensors(path: Path) -> dict:
    with open(path, "rb") as f:
        return check_safetensors(f, path.stat().st_size, path)


def read_weights(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    _check_safetensors(path)
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from e


# A checkpoint directory never needs a pickle: these suffixes, or a pickle/zip (torch.save) signature, mark one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _is_pickle(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == b"PK\x03\x04"


def verify_checkpoint(ckpt_dir) -> ModelConfig:
    """Check a checkpoint directory without loading a tensor or unpickling anything: config.json agrees with
    itself, no file in it is a pickle, every .safetensors file's header and byte ranges are whole, and
    model.safetensors holds exactly the tensors (names, shapes) the config describes. Returns the config;
    raises ValueError / FileNotFoundError naming the file."""
    ckpt = Path(ckpt_dir)
    cfg = load_config(ckpt)
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and _is_pickle(f):
            raise ValueError(f"{f}: a pickle file; this toolkit never unpickles (it can run code). Remove it; "
                             f"an original MiniMind .pth goes through `python -m minimind convert`")
    weights = ckpt / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing")
    header = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        h = _check_safetensors(f)
        if f == weights:
            header = h
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_state_dict(MiniMind(cfg)).items()}
    stored = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if cfg.tie_word_embeddings:  # a tied head stored anyway is harmless: load_weights_into drops it too
        stored.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match {CONFIG}: missing tensors {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for k, shape in expected.items():
        if stored[k] != shape:
            raise ValueError(f"{weights}: tensor {k} has shape {stored[k]}, {CONFIG} implies {shape}")
    return cfg


def load_weights_into(model: MiniMind, sd: dict[str, torch.Tensor], source) -> None:
    """Copy a state dict into `model`, checking names and shapes; errors name `source` and the tensor."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, want in expected.items():
        if tuple(sd[name].shape) != tuple(want.shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(sd[name].shape)}, "
                             f"the model expects {tuple(want.shape)}")
    model.load_state_dict(sd, strict=not model.config.tie_word_embeddings)


def load_model(ckpt_dir, device="cpu", dtype: torch.dtype | None = None) -> MiniMind:
    """The model of a checkpoint directory, in `dtype` (default: the dtype it was stored in)."""
    ckpt = Path(ckpt_dir)
    cfg = load_config(ckpt)
    sd = read_weights(ckpt / WEIGHTS)
    dtype = dtype or next((v.dtype for v in sd.values() if v.is_floating_point()), None)
    with torch.device(device):
        model = MiniMind(cfg)
    load_weights_into(model, sd, ckpt / WEIGHTS)
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_tokenizer(ckpt_dir):
    from .tokenizer import Tokenizer
    return Tokenizer.from_dir(ckpt_dir)


def load_checkpoint(ckpt_dir, device="cpu", dtype=None):
    """(model, tokenizer or None) from a checkpoint directory."""
    model = load_model(ckpt_dir, device, dtype)
    tok = load_tokenizer(ckpt_dir) if (Path(ckpt_dir) / "tokenizer.json").is_file() else None
    return model, tok


# MiniMind's first release (`Transformer`, 2024-2025) named its weights differently from MiniMind2.
_LEGACY_NAMES = [
    ("tok_embeddings.", "model.embed_tokens."), ("output.", "lm_head."), ("norm.", "model.norm."),
    ("attention.wq.", "self_attn.q_proj."), ("attention.wk.", "self_attn.k_proj."),
    ("attention.wv.", "self_attn.v_proj."), ("attention.wo.", "self_attn.o_proj."),
    ("attention_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
    ("feed_forward.w1.", "mlp.gate_proj."), ("feed_forward.w3.", "mlp.up_proj."),
    ("feed_forward.w2.", "mlp.down_proj."), ("feed_forward.", "mlp."),
]


def convert_minimind_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith(("freqs_cos", "freqs_sin", "pos_cis")):
            continue
        if key.startswith("layers."):
            key = "model." + key
            for old, new in _LEGACY_NAMES[3:]:
                key = key.replace(old, new)
        else:
            for old, new in _LEGACY_NAMES[:3]:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
        out[key] = value
    return out


def load_minimind_pth(path, cfg: ModelConfig | str, device="cpu") -> MiniMind:
    """Load an original MiniMind `.pth` state dict (MiniMind2 or first-release key names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged pickle/zip
        raise ValueError(f"{path}: not a readable torch state dict ({e})") from e
    model = MiniMind(cfg).to(device)
    load_weights_into(model, convert_minimind_keys(sd), path)
    return model
