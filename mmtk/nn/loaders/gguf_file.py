"""Load GGUF files (llama.cpp format) of Llama and Qwen2 models, dequantised with the ``gguf`` package."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtk.core.errors import InputError
from mmtk.core.logging import get_logger
from mmtk.nn.llm import DecoderConfig, DecoderLM
from mmtk.nn.loaders.common import model_from_state_dict

log = get_logger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# llama.cpp tensor names -> decoder names; "{i}" is the block index.
BLOCK_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_PATTERN = re.compile(r"^blk\.(\d+)\.(.+)$")


def open_gguf(path: str | Path):
    """Open ``path`` with ``gguf.GGUFReader``; InputError names the file when it is missing, corrupt or truncated."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file not found: {path}.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError, struct.error, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read GGUF file {path} (corrupt, truncated or not GGUF): {exc}") from exc


def read_metadata(reader, path: Path) -> dict[str, Any]:
    """Return the GGUF key-value metadata as plain Python values."""
    metadata = {}
    for name, field in reader.fields.items():
        try:
            metadata[name] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: metadata field {name} is unreadable: {exc}") from exc
    return metadata


def config_from_gguf(metadata: dict[str, Any], path: Path) -> DecoderConfig:
    """Translate GGUF ``{architecture}.*`` metadata into a ``DecoderConfig``.

    Raises:
        InputError: the architecture or its RoPE scaling is not supported, or
            a key is missing or has an invalid value (the message names both).
    """
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise InputError(f"{path}: GGUF metadata key {arch}.{name} is missing.")
        return value

    def positive_int(name: str, default: Any = None) -> int:
        value = key(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{path}: GGUF metadata key {arch}.{name} must be a positive integer, got {value!r}.")
        return int(value)

    def positive_float(name: str, default: Any = None) -> float:
        value = key(name, default)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value <= 0:
            raise InputError(f"{path}: GGUF metadata key {arch}.{name} must be a positive number, got {value!r}.")
        return float(value)

    rope_scaling = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": positive_float("rope.scaling.factor")}
    elif scaling_type != "none":
        raise InputError(f"{path}: RoPE scaling {scaling_type!r} is not supported; supported: none, linear.")

    num_heads = positive_int("attention.head_count")
    hidden_size = positive_int("embedding_length")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = metadata.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab_size is None:
        raise InputError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size.")
    if f"{arch}.attention.key_length" in metadata:
        head_dim = positive_int("attention.key_length")
    elif hidden_size % num_heads:
        raise InputError(f"{path}: {arch}.embedding_length {hidden_size} is not divisible by {arch}.attention.head_count {num_heads}, and {arch}.attention.key_length is missing.")
    else:
        head_dim = hidden_size // num_heads
    try:
        return DecoderConfig(
            vocab_size=int(vocab_size),
            hidden_size=hidden_size,
            intermediate_size=positive_int("feed_forward_length"),
            num_layers=positive_int("block_count"),
            num_heads=num_heads,
            num_kv_heads=positive_int("attention.head_count_kv", num_heads),
            head_dim=head_dim,
            max_position_embeddings=positive_int("context_length", 4096),
            rms_norm_eps=positive_float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=positive_float("rope.freq_base", 10000.0),
            rope_scaling=rope_scaling,
            attention_bias=arch == "qwen2",
            tie_word_embeddings=False,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: invalid model configuration: {exc}") from exc


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Llama q/k projection (out, in) or bias (out,).

    llama.cpp's converter reorders each head's rows from the half-split RoPE
    layout (first half, second half) into interleaved pairs; this restores
    the half-split order that ``apply_rotary`` expects.
    """
    rest = weight.shape[1:]
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def read_gguf_state(reader, config: DecoderConfig, arch: str, path: Path) -> dict[str, torch.Tensor]:
    """Dequantise every tensor of ``reader`` to fp32 and rename it to the decoder's names."""
    import gguf

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        match = _BLOCK_PATTERN.match(name)
        rest = None
        if match:
            block, rest = match.groups()
            if rest not in BLOCK_TENSOR_NAMES:
                raise InputError(f"{path}: tensor {name} is not part of a {arch} decoder this loader supports.")
            target = f"layers.{block}.{BLOCK_TENSOR_NAMES[rest]}"
        elif name in GLOBAL_TENSOR_NAMES:
            target = GLOBAL_TENSOR_NAMES[name]
        elif name == "rope_freqs.weight":
            raise InputError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 scaling) are not supported.")
        else:
            raise InputError(f"{path}: tensor {name} is not part of a {arch} decoder this loader supports.")

        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: cannot dequantise tensor {name} of type {tensor.tensor_type.name}: {exc}") from exc
        values = np.array(values, dtype=np.float32)  # a copy, because F32 tensors are read-only views of the file

        if arch == "llama" and rest in ("attn_q.weight", "attn_q.bias"):
            values = unpermute_rope_rows(values, config.num_heads)
        elif arch == "llama" and rest in ("attn_k.weight", "attn_k.bias"):
            values = unpermute_rope_rows(values, config.num_kv_heads)
        state[target] = torch.from_numpy(np.ascontiguousarray(values))
    return state


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, "Tokenizer | None"]:
    """Load a Llama or Qwen2 GGUF file: the dequantised model and the tokenizer from its metadata.

    A file without ``output.weight`` ties the output head to the embedding.
    The tokenizer is None when the file carries no byte-level BPE tokenizer.

    Raises:
        InputError: the file is missing, corrupt, of an unsupported
            architecture or holds tensors that do not fit its metadata.
    """
    from mmtk.nn.tokenizer import Tokenizer

    path = Path(path)
    reader = open_gguf(path)
    metadata = read_metadata(reader, path)
    config = config_from_gguf(metadata, path)
    arch = metadata["general.architecture"]
    if not any(t.name == "output.weight" for t in reader.tensors):
        config.tie_word_embeddings = True

    log.debug("dequantising %d tensors of %s", len(reader.tensors), path)
    state = read_gguf_state(reader, config, arch, path)
    model = model_from_state_dict(config, state, path, device, dtype)

    tokenizer = None
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    if tokenizer_model == "gpt2":
        tokenizer = Tokenizer.from_gguf_metadata(metadata, path)
    elif tokenizer_model is not None:
        log.warning("%s: tokenizer model %r is not supported, so the model loads without a tokenizer", path, tokenizer_model)
    return model, tokenizer
