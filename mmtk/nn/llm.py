"""Llama-family decoder language model (Llama 2/3, TinyLlama, Qwen2, SmolLM2).

Architecture: token embedding, ``num_layers`` pre-norm blocks of
RMSNorm -> grouped-query self-attention with rotary position embeddings ->
residual, RMSNorm -> SwiGLU MLP -> residual, a final RMSNorm and a linear
output head (optionally tied to the embedding).

Attention runs through ``torch.nn.functional.scaled_dot_product_attention``
and accepts an arbitrary per-sample boolean mask, so one sequence may mix
causal text spans with bidirectional spans (for example image patches).

Module and parameter names follow the Hugging Face Llama layout without its
``model.`` prefix (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``layers.N.mlp.gate_proj``, ``layers.N.input_layernorm``, ``norm``,
``lm_head``), so Hugging Face checkpoints map onto it by a rename.

Mask semantics for ``attention_mask`` (``T`` = new positions, ``S`` = past + ``T``
key positions):

* None: causal attention over the past and the new positions.
* (B, S) or (B, T) when there is no past: padding mask, 1/True = real token,
  0/False = padding; combined with causal attention.
* (B, T, S) or (B, 1, T, S) boolean: True = query may attend to key, used as
  given (no causal mask is added). A float mask of these shapes is added to
  the attention scores (0 = attend, -inf = blocked).

A query row whose boolean mask blocks every key attends to all keys instead,
which keeps the output finite (such rows are padding and their outputs are
meaningless).

Example::

    config = DecoderConfig.smollm2_135m()
    model = DecoderLM(config)
    out = model(input_ids, use_cache=True)                 # out.logits (B, T, V)
    step = model(next_ids, past_key_values=out.past_key_values, use_cache=True)
    hidden = model.encode(inputs_embeds=embeds, attention_mask=mask)  # (B, T, D)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtk.nn.lora import AdaptableLinear, LowRankDelta, sample_deltas

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_positive_number(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a finite int or float above zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


# ---- configuration ----------------------------------------------------------------------


@dataclass
class DecoderConfig:
    """Hyper-parameters of a Llama-family decoder.

    Attributes:
        vocab_size: number of token ids.
        hidden_size: model width D.
        intermediate_size: hidden width of the SwiGLU MLP.
        num_layers: number of decoder blocks.
        num_heads: query heads H.
        num_kv_heads: key/value heads (grouped-query attention); must divide
            ``num_heads``. None means ``num_heads`` (multi-head attention).
        head_dim: width per head; None means ``hidden_size // num_heads``.
        max_position_embeddings: context length the model was trained for
            (informational, and the base of the llama3 RoPE scaling).
        rms_norm_eps: epsilon added to the mean square in RMSNorm.
        rope_theta: RoPE base frequency.
        rope_scaling: None, or a mapping with ``rope_type`` (``"linear"`` or
            ``"llama3"``) and ``factor``; llama3 also needs
            ``low_freq_factor``, ``high_freq_factor`` and
            ``original_max_position_embeddings``.
        attention_bias: q/k/v projections carry a bias (Qwen2: True).
        attention_out_bias: output projection carries a bias.
        mlp_bias: MLP projections carry biases.
        tie_word_embeddings: the output head shares the embedding matrix.
        bos_token_id, eos_token_id, pad_token_id: special ids (informational;
            ``eos_token_id`` may be a list).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if value is None and name in ("num_kv_heads", "head_dim"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            check_positive_number(name, getattr(self, name))
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; set head_dim")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            self.check_rope_scaling()

    def check_rope_scaling(self) -> None:
        """Raise ValueError when ``rope_scaling`` has an unsupported type, or lacks or misstates a key its type needs."""
        if not isinstance(self.rope_scaling, Mapping):
            raise ValueError(f"rope_scaling must be a mapping or None, got {self.rope_scaling!r}")
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        for key in ROPE_SCALING_KEYS[rope_type]:
            if key not in self.rope_scaling:
                raise ValueError(f"rope_scaling of type {rope_type!r} needs the key {key!r}, which is missing: {dict(self.rope_scaling)}")
            check_positive_number(f"rope_scaling {key!r}", self.rope_scaling[key])
        if rope_type == "llama3" and not self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"]:
            raise ValueError(
                f"rope_scaling 'high_freq_factor' ({self.rope_scaling['high_freq_factor']!r}) must be larger than "
                f"'low_freq_factor' ({self.rope_scaling['low_freq_factor']!r})"
            )

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids as a list (empty when unknown)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain mapping (for JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DecoderConfig":
        """Build a config from ``to_dict`` output; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DecoderConfig keys: {', '.join(unknown)}")
        return cls(**values)

    # ---- presets (published hyper-parameters) ----

    @classmethod
    def llama2_7b(cls) -> "DecoderConfig":
        """Llama 2 7B."""
        return cls(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                   max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)

    @classmethod
    def llama3_8b(cls) -> "DecoderConfig":
        """Llama 3 8B."""
        return cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                   max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)

    @classmethod
    def llama3_1_8b(cls) -> "DecoderConfig":
        """Llama 3.1 8B (llama3 RoPE scaling to 128k context)."""
        return cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                   bos_token_id=128000, eos_token_id=[128001, 128008, 128009])

    @classmethod
    def tinyllama_1_1b(cls) -> "DecoderConfig":
        """TinyLlama 1.1B."""
        return cls(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                   max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)

    @classmethod
    def qwen2_0_5b(cls) -> "DecoderConfig":
        """Qwen2 0.5B (q/k/v bias, tied embeddings)."""
        return cls(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                   max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=True,
                   tie_word_embeddings=True, bos_token_id=None, eos_token_id=151643)

    @classmethod
    def qwen2_7b(cls) -> "DecoderConfig":
        """Qwen2 7B (q/k/v bias)."""
        return cls(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                   max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=True,
                   bos_token_id=None, eos_token_id=151643)

    @classmethod
    def smollm2_135m(cls) -> "DecoderConfig":
        """SmolLM2-135M (tied embeddings)."""
        return cls(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                   max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2, pad_token_id=2)

    @classmethod
    def smollm2_360m(cls) -> "DecoderConfig":
        """SmolLM2-360M (tied embeddings)."""
        return cls(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15, num_kv_heads=5,
                   max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2, pad_token_id=2)

    @classmethod
    def preset(cls, name: str) -> "DecoderConfig":
        """Return a preset by name (see ``PRESETS``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return getattr(cls, PRESETS[name])()


PRESETS = {
    "llama2-7b": "llama2_7b",
    "llama3-8b": "llama3_8b",
    "llama3.1-8b": "llama3_1_8b",
    "tinyllama-1.1b": "tinyllama_1_1b",
    "qwen2-0.5b": "qwen2_0_5b",
    "qwen2-7b": "qwen2_7b",
    "smollm2-135m": "smollm2_135m",
    "smollm2-360m": "smollm2_360m",
}


# ---- building blocks --------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``weight * x / sqrt(mean(x^2) + eps)``, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: DecoderConfig) -> torch.Tensor:
    """Return the RoPE inverse frequencies (head_dim / 2,) after any configured scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))

    if rope_type == "linear":
        # Position interpolation: positions are divided by the factor.
        inv_freq = inv_freq / float(scaling["factor"])

    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
        # and the band between is interpolated smoothly.
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor

        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) in the half-split layout used by Hugging Face Llama weights."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the frequencies in fp32 when the model moves to bf16/fp16, because
        # low-precision frequencies shift the rotation angles at large positions.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inverse_frequencies(self.config).to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos and sin, each (B, T, head_dim), for integer ``position_ids`` (B, T)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]  # (B, T, head_dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, heads, T, head_dim) by the angles in cos/sin (B, T, head_dim)."""
    cos = cos[:, None]  # (B, 1, T, head_dim)
    sin = sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of past positions for every block, in growing preallocated buffers.

    Each layer's buffer has shape (B, num_kv_heads, capacity, head_dim) and grows
    by doubling, so appending one decode step does not copy the whole cache.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def get_seq_length(self, layer: int = 0) -> int:
        """Return the number of cached positions of ``layer``."""
        return self.lengths[layer]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key``/``value`` (B, kv_heads, T, head_dim); return all cached (B, kv_heads, S, head_dim)."""
        length = self.lengths[layer]
        new_length = length + key.shape[2]
        buffer_k, buffer_v = self.keys[layer], self.values[layer]

        if buffer_k is None or new_length > buffer_k.shape[2]:
            capacity = max(new_length, 2 * (buffer_k.shape[2] if buffer_k is not None else 0), 64)
            shape = (key.shape[0], key.shape[1], capacity, key.shape[3])
            grown_k = key.new_empty(shape)
            grown_v = value.new_empty(shape)
            if buffer_k is not None:
                grown_k[:, :, :length] = buffer_k[:, :, :length]
                grown_v[:, :, :length] = buffer_v[:, :, :length]
            buffer_k, buffer_v = grown_k, grown_v
            self.keys[layer], self.values[layer] = buffer_k, buffer_v

        buffer_k[:, :, length:new_length] = key
        buffer_v[:, :, length:new_length] = value
        self.lengths[layer] = new_length
        return buffer_k[:, :, :new_length], buffer_v[:, :, :new_length]

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on, for example queries appended for one pass only."""
        if length < 0:
            raise ValueError(f"cannot crop a KV cache to a negative length ({length})")
        self.lengths = [min(current, length) for current in self.lengths]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (for example finished beams removed)."""
        for layer in range(len(self.keys)):
            if self.keys[layer] is not None:
                self.keys[layer] = self.keys[layer].index_select(0, index)
                self.values[layer] = self.values[layer].index_select(0, index)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    def __init__(self, config: DecoderConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = AdaptableLinear(config.hidden_size, config.num_heads * config.head_dim, bias=config.attention_bias)
        self.k_proj = AdaptableLinear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=config.attention_bias)
        self.v_proj = AdaptableLinear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=config.attention_bias)
        self.o_proj = AdaptableLinear(config.num_heads * config.head_dim, config.hidden_size, bias=config.attention_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """Attend ``x`` (B, T, D) to itself and the cache; ``mask`` is (B, 1, T, S) or None."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)

        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, Hkv, S, hd)

        grouped = self.num_kv_heads != self.num_heads
        if grouped and mask is not None and q.device.type == "cuda":
            # CUDA's memory-efficient kernel takes arbitrary masks but not grouped heads,
            # so repeat the key/value heads rather than fall back to the math kernel.
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            grouped = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, enable_gqa=grouped)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = AdaptableLinear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = AdaptableLinear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = AdaptableLinear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: DecoderConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


# ---- masks ------------------------------------------------------------------------------


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Return the boolean causal mask (T, T): True where key index <= query index."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def causal_mask_with_bidirectional_spans(
    length: int, spans: Iterable[Iterable[tuple[int, int]]], device: torch.device | str | None = None
) -> torch.Tensor:
    """Return a (B, T, T) boolean mask: causal everywhere, and full attention inside each span.

    Args:
        length: sequence length T.
        spans: one list per sample of half-open ``(start, end)`` position
            ranges whose positions all attend to each other (for example an
            image's patch tokens); positions outside the spans stay causal.
    """
    masks = []
    for sample_spans in spans:
        mask = causal_mask(length, device)
        for start, end in sample_spans:
            if not 0 <= start <= end <= length:
                raise ValueError(f"span ({start}, {end}) lies outside a sequence of length {length}")
            mask[start:end, start:end] = True
        masks.append(mask)
    return torch.stack(masks)  # (B, T, T)


def padding_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return position ids (B, S) that skip padding: 0 at each sample's first real token."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, past_length: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Turn the public ``attention_mask`` into the SDPA mask (B, 1, T, S) and an ``is_causal`` flag.

    See the module docstring for the accepted forms. Returns ``(None, True)``
    for plain causal attention without a past, which lets SDPA use its causal kernel.
    """
    total = past_length + length

    if attention_mask is None:
        if length == 1:
            return None, False
        if past_length == 0:
            return None, True
        mask = torch.ones(length, total, dtype=torch.bool, device=device).tril(diagonal=past_length)
        return mask[None, None], False

    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch, total):
            raise ValueError(f"a 2-D attention_mask must have shape (B, past + T) = ({batch}, {total}), got {tuple(attention_mask.shape)}")
        keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        causal = torch.ones(length, total, dtype=torch.bool, device=device).tril(diagonal=past_length)
        mask = keys & causal[None, None]  # (B, 1, T, S)
    elif attention_mask.dim() in (3, 4):
        mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None]
        if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[-2:] != (length, total):
            raise ValueError(
                f"a {attention_mask.dim()}-D attention_mask must have shape (B, T, S) or (B, 1, T, S) = "
                f"({batch}, {length}, {total}) or ({batch}, 1, {length}, {total}), got {tuple(attention_mask.shape)}"
            )
        mask = mask.to(device)
        if mask.dtype != torch.bool:
            return mask.to(dtype), False
    else:
        raise ValueError(f"attention_mask must be 2-D, 3-D or 4-D, got {attention_mask.dim()}-D")

    # Rows that block every key would give NaN; let them attend everywhere.
    empty_rows = ~mask.any(dim=-1, keepdim=True)
    if bool(empty_rows.any()):
        mask = mask | empty_rows
    return mask, False


# ---- the model --------------------------------------------------------------------------


@dataclass
class DecoderOutput:
    """Result of ``DecoderLM.forward``.

    Attributes:
        logits: (B, T', V) next-token logits, fp32; T' = T, or fewer with
            ``logits_to_keep``; None with ``compute_logits=False``.
        hidden_states: (B, T, D) output of the final RMSNorm.
        past_key_values: the updated cache with ``use_cache``, else None.
        all_hidden_states: with ``output_hidden_states``, the input of every
            block plus the final normed output, ``num_layers + 1`` tensors (B, T, D).
    """

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    past_key_values: KVCache | None = None
    all_hidden_states: list[torch.Tensor] | None = field(default=None)


class DecoderLM(nn.Module):
    """Llama-family decoder-only language model; see the module docstring for masks and names."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderBlock(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def tie_weights(self) -> None:
        """Point the output head at the embedding again (after loading a state dict)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self) -> KVCache:
        """Return an empty KV cache for this model."""
        return KVCache(self.config.num_layers)

    def linear_names(self, targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), blocks: Iterable[int] | None = None) -> list[str]:
        """Return the module names of the chosen linears, the keys that ``deltas`` and ``add_lora`` use.

        Args:
            targets: short names among q_proj, k_proj, v_proj, o_proj,
                gate_proj, up_proj, down_proj.
            blocks: block indices; None means all blocks.
        """
        block_list = range(self.config.num_layers) if blocks is None else list(blocks)
        names = []
        for index in block_list:
            for target in targets:
                group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                names.append(f"layers.{index}.{group}.{target}")
        return names

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        deltas: Mapping[str, LowRankDelta] | None = None,
        output_hidden_states: bool = False,
        compute_logits: bool = True,
        logits_to_keep: int = 0,
    ) -> DecoderOutput:
        """Run the decoder on T new positions.

        Args:
            input_ids: (B, T) token ids; give this or ``inputs_embeds``.
            inputs_embeds: (B, T, D) input vectors in place of token embeddings.
            attention_mask: None, (B, S) padding mask, or (B, T, S) /
                (B, 1, T, S) mask with True = may attend (S = past + T); see
                the module docstring.
            position_ids: (B, T) or (T,) RoPE positions; default ``past + arange(T)``,
                or derived from a 2-D padding mask so padding is skipped.
            past_key_values: a ``KVCache`` from an earlier call (updated in place).
            use_cache: return a cache (a new one when ``past_key_values`` is None).
            deltas: per-sample low-rank weight deltas for this call, by module
                name (see ``linear_names``).
            output_hidden_states: also return every block's input.
            compute_logits: skip the output head when False (encoder use).
            logits_to_keep: when > 0, compute logits for the last this-many positions only.

        Returns:
            DecoderOutput with logits (B, T', V) in fp32, hidden_states (B, T, D)
            and the cache.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        batch, length, _ = x.shape

        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        past_length = cache.get_seq_length() if cache is not None else 0

        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = padding_position_ids(attention_mask)[:, -length:]
            else:
                position_ids = torch.arange(past_length, past_length + length, device=x.device)[None].expand(batch, length)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(batch, length)
        position_ids = position_ids.to(x.device)
        cos, sin = self.rotary(position_ids, x.dtype)  # (B, T, hd) each
        mask, is_causal = build_attention_mask(attention_mask, batch, length, past_length, x.dtype, x.device)

        all_hidden = [] if output_hidden_states else None
        with sample_deltas(self, deltas, batch):
            for block in self.layers:
                if all_hidden is not None:
                    all_hidden.append(x)
                x = block(x, cos, sin, mask, is_causal, cache)
        x = self.norm(x)  # (B, T, D)
        if all_hidden is not None:
            all_hidden.append(x)

        logits = None
        if compute_logits:
            head_input = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
            logits = self.lm_head(head_input).float()  # (B, T', V)
        return DecoderOutput(logits=logits, hidden_states=x, past_key_values=cache if use_cache else None, all_hidden_states=all_hidden)

    def encode(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        deltas: Mapping[str, LowRankDelta] | None = None,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Return hidden states (B, T, D) for use of the decoder as an encoder.

        Args:
            layer: None for the final normed output; ``i`` in
                ``0..num_layers`` for the input of block ``i`` (``num_layers``
                is again the final normed output).
            Other arguments as in ``forward``.

        Raises:
            ValueError: ``layer`` is outside ``0..num_layers``.
        """
        num_layers = self.config.num_layers
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers):
            raise ValueError(f"layer must be None or an int in 0..{num_layers} (the input of block i, or {num_layers} for the final output), got {layer!r}")
        out = self.forward(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            deltas=deltas, output_hidden_states=layer is not None, compute_logits=False,
        )
        if layer is None:
            return out.hidden_states
        return out.all_hidden_states[layer]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Iterable[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each sequence with the KV cache; returns the new token ids (B, N), N <= max_new_tokens.

        Args:
            input_ids: (B, T) prompt ids, left-padded when lengths differ
                (then pass the (B, T) ``attention_mask``).
            temperature: 0 for greedy decoding, else the softmax temperature.
            top_p: nucleus sampling threshold in (0, 1]; 1 disables it.
            stop_token_ids: ids that end a sequence (default: the config's
                EOS ids). The stop token is included in the output; later
                positions of a finished row hold ``pad_token_id``.
            inputs_embeds: (B, T, D) prompt vectors in place of ``input_ids``.
            pad_token_id: filler after a row stopped (default: first stop id, else 0).
            generator: random generator for sampling.
        """
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        stop_ids = list(self.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        if pad_token_id is None:
            pad_token_id = stop_ids[0] if stop_ids else 0
        stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=self.device)

        out = self.forward(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        batch = out.hidden_states.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        mask = attention_mask
        position = None
        if mask is not None:
            position = padding_position_ids(mask)[:, -1:]  # (B, 1)

        tokens = []
        for step in range(max_new_tokens):
            next_ids = sample_next_token(out.logits[:, -1], temperature, top_p, generator)  # (B,)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
            tokens.append(next_ids)
            if stop_ids:
                finished = finished | torch.isin(next_ids, stop_tensor)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break

            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                position = position + 1
            out = self.forward(input_ids=next_ids[:, None], attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
        if not tokens:
            return torch.empty(batch, 0, dtype=torch.long, device=self.device)
        return torch.stack(tokens, dim=1)  # (B, N)


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V): argmax when ``temperature`` is 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)

    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = cumulative - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
