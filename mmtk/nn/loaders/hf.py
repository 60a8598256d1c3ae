"""Load Hugging Face-format model folders: ``config.json``, safetensors shards, ``tokenizer.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmtk.core.errors import InputError
from mmtk.core.logging import get_logger
from mmtk.nn.llm import SUPPORTED_ROPE_TYPES, DecoderConfig, DecoderLM, check_positive_number
from mmtk.nn.loaders.common import model_from_state_dict

log = get_logger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Return the JSON object in ``path``; InputError names the file when it is missing or malformed."""
    if not path.is_file():
        raise InputError(f"{what} not found: {path}.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InputError(f"{path} must contain a JSON object, not {type(value).__name__}.")
    return value


def config_from_hf(values: dict[str, Any], source: Path) -> DecoderConfig:
    """Translate a Hugging Face ``config.json`` of a Llama or Qwen2 model into a ``DecoderConfig``.

    Reads both the older ``rope_theta``/``rope_scaling`` keys and the
    ``rope_parameters`` mapping that transformers 5 writes.

    Raises:
        InputError: the model type, activation, RoPE scaling or sliding window
            is not supported, or a value is missing or invalid (the message
            names the key and the value).
    """
    model_type = values.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    activation = values.get("hidden_act", "silu")
    if activation != "silu":
        raise InputError(f"{source}: hidden_act {activation!r} is not supported; the decoder uses SwiGLU (silu).")
    if values.get("use_sliding_window"):
        raise InputError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported.")

    rope = values.get("rope_parameters") or {}
    legacy_scaling = values.get("rope_scaling")
    for key, value in (("rope_parameters", rope), ("rope_scaling", legacy_scaling)):
        if value is not None and not isinstance(value, dict):
            raise InputError(f"{source}: {key} must be a JSON object or null, got {value!r}.")
    rope = dict(rope)
    if legacy_scaling:
        rope.update(legacy_scaling)
    rope_theta = rope.pop("rope_theta", values.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise InputError(f"{source}: RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

    qkv_bias = bool(values.get("attention_bias", False)) or model_type == "qwen2"
    num_heads = config_int(values, "num_attention_heads", source)
    try:
        return DecoderConfig(
            vocab_size=config_int(values, "vocab_size", source),
            hidden_size=config_int(values, "hidden_size", source),
            intermediate_size=config_int(values, "intermediate_size", source),
            num_layers=config_int(values, "num_hidden_layers", source),
            num_heads=num_heads,
            num_kv_heads=config_int(values, "num_key_value_heads", source, default=num_heads),
            head_dim=config_int(values, "head_dim", source, default=None),
            max_position_embeddings=config_int(values, "max_position_embeddings", source, default=4096),
            rms_norm_eps=config_number(values, "rms_norm_eps", source, default=1e-6),
            rope_theta=config_number({"rope_theta": rope_theta}, "rope_theta", source),
            rope_scaling=rope_scaling,
            attention_bias=qkv_bias,
            attention_out_bias=model_type == "llama" and bool(values.get("attention_bias", False)),
            mlp_bias=bool(values.get("mlp_bias", False)),
            tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
            bos_token_id=values.get("bos_token_id"),
            eos_token_id=values.get("eos_token_id"),
            pad_token_id=values.get("pad_token_id"),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: invalid configuration: {exc}.") from exc


_REQUIRED = object()


def config_int(values: dict[str, Any], key: str, source: Path, default: Any = _REQUIRED) -> Any:
    """Return ``values[key]`` as a positive int; a missing or null key gives ``default``.

    Raises:
        InputError: the key is required and missing, or its value is not a
            positive integer (integral floats such as 64.0 are accepted).
    """
    value = values.get(key)
    if value is None:
        if default is _REQUIRED:
            raise InputError(f"{source}: required key {key!r} is missing.")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{source}: {key} must be a positive integer, got {value!r}.")
    return value


def config_number(values: dict[str, Any], key: str, source: Path, default: Any = _REQUIRED) -> float:
    """Return ``values[key]`` as a positive finite float; a missing or null key gives ``default``.

    Raises:
        InputError: the key is required and missing, or its value is not a positive number.
    """
    value = values.get(key)
    if value is None:
        if default is _REQUIRED:
            raise InputError(f"{source}: required key {key!r} is missing.")
        return default
    try:
        check_positive_number(key, value)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}.") from exc
    return float(value)


def weight_files(folder: Path) -> list[Path]:
    """Return the safetensors files of a model folder (one file or the shards of an index)."""
    single = folder / "model.safetensors"
    index_path = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index_path.is_file():
        index = read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: 'weight_map' is missing or empty.")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise InputError(f"{index_path} lists shard(s) that are not in the folder: {', '.join(absent[:4])}.")
        return files
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise InputError(f"{folder} contains only pickle weights (.bin/.pt), which mmtk does not load for safety; convert them to safetensors.")
    raise InputError(f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json with its shards.")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Return all tensors of ``files``, renamed to the decoder's names (``model.`` prefix dropped)."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    state[key.removeprefix("model.")] = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"cannot read safetensors file {path} (corrupt or truncated): {exc}") from exc
    return state


def load_hf_directory(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, "Tokenizer | None"]:
    """Load a Llama or Qwen2 model folder in Hugging Face format.

    Returns the model in eval mode and its tokenizer (None when the folder has
    no ``tokenizer.json``).

    Raises:
        InputError: a missing or malformed file, an unsupported configuration
            or weights that do not fit it; the message names the file.
    """
    from mmtk.nn.tokenizer import Tokenizer

    folder = Path(folder)
    config_path = folder / "config.json"
    config = config_from_hf(read_json(config_path, "model config"), config_path)
    files = weight_files(folder)
    log.debug("loading %d safetensors file(s) from %s", len(files), folder)
    state = read_safetensors(files)
    model = model_from_state_dict(config, state, files[0] if len(files) == 1 else folder, device, dtype)

    tokenizer = Tokenizer.from_directory(folder) if (folder / "tokenizer.json").is_file() else None
    return model, tokenizer
