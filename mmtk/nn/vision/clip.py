"""CLIP vision transformer that loads Hugging Face CLIP vision weights.

The network is the pre-norm ViT of CLIP. A patch convolution without bias,
a learned class token and absolute position embeddings feed a LayerNorm and
then the transformer blocks (LayerNorm, multi-head self-attention, LayerNorm,
MLP). The pooled output is the class token after a final LayerNorm, and an
optional linear projection maps it into the joint image-text space.

:func:`load_clip_vision` reads a local Hugging Face directory (``config.json``
plus ``model.safetensors`` or a sharded safetensors index) saved from
``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or ``CLIPModel``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtk.core.errors import DataError, InputError
from mmtk.core.logging import get_logger

log = get_logger(__name__)

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class ClipVisionConfig:
    """Shape of a CLIP vision transformer; field names follow Hugging Face's ``CLIPVisionConfig``.

    Defaults are those of ViT-B/32 (OpenAI CLIP). ``projection_dim`` is None
    when the checkpoint has no visual projection.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise InputError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}.")
        if self.image_size % self.patch_size != 0:
            raise InputError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}.")
        if self.hidden_act not in ACTIVATIONS:
            raise InputError(f"hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(ACTIVATIONS)}.")

    @property
    def num_patches(self) -> int:
        """Number of patch tokens per image, not counting the class token."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ClipVisionOutput:
    """Outputs of :class:`ClipVisionTransformer` for a batch of B images of T = 1 + patches tokens.

    Attributes:
        last_hidden_state: (B, T, hidden_size) output of the last block, before the final LayerNorm.
        pooled: (B, hidden_size) class token after the final LayerNorm.
        grid_size: (rows, columns) of the patch grid, so T = 1 + rows * columns.
        hidden_states: (num_hidden_layers + 1) tensors (B, T, hidden_size), the encoder input
            (after the pre-encoder LayerNorm) followed by each block's output; None unless requested.
        image_embeds: (B, projection_dim) projected pooled output; None without a projection.
    """

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    grid_size: tuple[int, int]
    hidden_states: tuple[torch.Tensor, ...] | None = None
    image_embeds: torch.Tensor | None = None

    def patch_feature_map(self) -> torch.Tensor:
        """Arrange the patch tokens of ``last_hidden_state`` as a feature map (B, C, rows, columns)."""
        patches = self.last_hidden_state[:, 1:]  # (B, P, C), class token removed
        rows, columns = self.grid_size
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, rows, columns)  # (B, C, rows, columns)


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


class ClipAttention(nn.Module):
    """Multi-head self-attention over all tokens, with biased query, key, value and output projections."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads

        # (B, T, C) -> (B, heads, T, head_dim)
        q = self.q_proj(x).view(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, self.num_heads, head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(batch, tokens, width)  # (B, T, C)
        return self.out_proj(y)


class ClipMLP(nn.Module):
    """Two-layer feed-forward network with CLIP's activation (QuickGELU for OpenAI weights)."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.activation = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_activation(self.activation, self.fc1(x)))


class ClipBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = ClipAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class ClipVisionTransformer(nn.Module):
    """CLIP image encoder: normalised pixels (B, 3, S, S) -> :class:`ClipVisionOutput`.

    Inputs are expected at ``config.image_size`` and normalised with
    :data:`mmtk.nn.image.CLIP_MEAN` and :data:`mmtk.nn.image.CLIP_STD`.
    """

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_token = nn.Parameter(torch.zeros(width))
        self.position_embedding = nn.Parameter(torch.zeros(config.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([ClipBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_post = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.projection = nn.Linear(width, config.projection_dim, bias=False) if config.projection_dim else None

    def forward(self, pixels: torch.Tensor, output_hidden_states: bool = False, interpolate_pos_encoding: bool = False) -> ClipVisionOutput:
        """Encode normalised pixels (B, 3, H, W).

        H and W must equal ``config.image_size`` unless ``interpolate_pos_encoding``
        is set. Then any sides divisible by the patch size are accepted and
        the grid of patch position embeddings is resized bicubically to the
        input's patch grid, as transformers does.
        """
        config = self.config
        if pixels.ndim != 4 or pixels.shape[1] != config.num_channels:
            raise InputError(f"pixels have shape {tuple(pixels.shape)}; expected (B, {config.num_channels}, {config.image_size}, {config.image_size}).")
        height, width = pixels.shape[-2:]
        if not interpolate_pos_encoding and (height, width) != (config.image_size, config.image_size):
            raise InputError(
                f"pixels are {height}x{width}; this model takes {config.image_size}x{config.image_size}. "
                "Resize the images first, or pass interpolate_pos_encoding=True."
            )
        if height % config.patch_size or width % config.patch_size:
            raise InputError(f"pixels are {height}x{width}; both sides must be divisible by the patch size {config.patch_size}.")
        batch = pixels.shape[0]
        grid_size = (height // config.patch_size, width // config.patch_size)

        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, C)
        class_token = self.class_token.view(1, 1, -1).expand(batch, 1, -1)  # (B, 1, C)
        x = torch.cat([class_token, x], dim=1)  # (B, T, C), T = P + 1
        x = x + self._position_embedding(grid_size)  # (B, T, C)
        x = self.ln_pre(x)

        hidden_states = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x)
            if hidden_states is not None:
                hidden_states.append(x)

        pooled = self.ln_post(x[:, 0])  # (B, C)
        image_embeds = self.projection(pooled) if self.projection is not None else None  # (B, projection_dim)
        return ClipVisionOutput(
            last_hidden_state=x,
            pooled=pooled,
            grid_size=grid_size,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            image_embeds=image_embeds,
        )

    def _position_embedding(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Position embeddings (T, C) for a patch grid of ``grid_size`` = (rows, columns)."""
        trained_side = self.config.image_size // self.config.patch_size
        if grid_size == (trained_side, trained_side):
            return self.position_embedding

        class_position = self.position_embedding[:1]  # (1, C)
        patch_positions = self.position_embedding[1:]  # (P, C)
        width = patch_positions.shape[-1]
        patch_positions = patch_positions.reshape(1, trained_side, trained_side, width).permute(0, 3, 1, 2)  # (1, C, s, s)
        patch_positions = F.interpolate(patch_positions, size=grid_size, mode="bicubic", align_corners=False)  # (1, C, rows, columns)
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(-1, width)  # (rows * columns, C)
        return torch.cat([class_position, patch_positions], dim=0)  # (T, C)


# Entries of a full CLIPModel checkpoint that the vision tower does not use.
_HF_IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")

# Hugging Face CLIP parameter names -> names in ClipVisionTransformer. The
# "vision_model." prefix is removed before matching.
_HF_NAME_RULES = [
    (re.compile(r"^embeddings\.patch_embedding\.weight$"), "patch_embed.weight"),
    (re.compile(r"^embeddings\.class_embedding$"), "class_token"),
    (re.compile(r"^embeddings\.position_embedding\.weight$"), "position_embedding"),
    (re.compile(r"^pre_layrnorm\.(weight|bias)$"), r"ln_pre.\1"),
    (re.compile(r"^post_layernorm\.(weight|bias)$"), r"ln_post.\1"),
    (re.compile(r"^encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$"), r"blocks.\1.ln_1.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$"), r"blocks.\1.ln_2.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$"), r"blocks.\1.attn.\2.\3"),
    (re.compile(r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"blocks.\1.mlp.\2.\3"),
]


def map_hf_clip_vision_name(name: str) -> str | None:
    """Translate one Hugging Face CLIP parameter name into this module's name.

    Vision names carry a ``vision_model.`` prefix in ``CLIPModel`` and in
    files written by transformers 4, and none in ``CLIPVisionModel`` files
    written by transformers 5. Returns None for entries that the vision tower
    does not use (the text tower, ``logit_scale``, ``text_projection``, the
    ``position_ids`` buffer). Raises DataError for an unknown name.
    """
    if name == "visual_projection.weight":
        return "projection.weight"
    if name.startswith(_HF_IGNORED_PREFIXES):
        return None
    if name.startswith("vision_model."):
        name = name[len("vision_model.") :]
    if name == "embeddings.position_ids":
        return None
    for pattern, replacement in _HF_NAME_RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    raise DataError(f"unknown CLIP vision parameter {name!r}; the checkpoint does not match a Hugging Face CLIP vision model.")


def read_clip_vision_config(folder: str | Path) -> ClipVisionConfig:
    """Read ``config.json`` of a Hugging Face CLIP checkpoint folder into a :class:`ClipVisionConfig`.

    Accepts a ``CLIPVisionConfig`` (``model_type`` ``clip_vision_model``) or a
    full ``CLIPConfig`` with a ``vision_config`` entry. ``projection_dim`` is
    taken from the file but only kept by :func:`load_clip_vision` when the
    weights contain a visual projection.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise InputError(f"CLIP weights folder not found: {folder}. Pass a local Hugging Face folder with config.json and *.safetensors.")
    if not path.is_file():
        raise InputError(f"config.json not found in CLIP weights folder {folder}.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path} does not contain a JSON object.")

    vision = raw.get("vision_config", raw)
    if not isinstance(vision, dict):
        raise DataError(f"{path}: 'vision_config' is not a JSON object.")
    known = {field.name for field in fields(ClipVisionConfig)}
    values = {key: value for key, value in vision.items() if key in known}
    # In a full CLIPConfig the top-level projection_dim sizes the visual projection.
    if vision is not raw and "projection_dim" in raw:
        values["projection_dim"] = raw["projection_dim"]
    try:
        return ClipVisionConfig(**values)
    except (TypeError, InputError) as exc:
        raise DataError(f"invalid CLIP vision configuration in {path}: {exc}") from exc


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read the shard index {index_path}: {exc}") from exc
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"no *.safetensors file in CLIP weights folder {folder}; convert the weights to safetensors.")

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise DataError(f"safetensors shard {file} named in {index_path} is missing.")
        try:
            tensors.update(load_file(file, device="cpu"))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"cannot read safetensors file {file} (corrupt or truncated): {exc}") from exc
    return tensors


def load_clip_vision(folder: str | Path, dtype: torch.dtype = torch.float32) -> ClipVisionTransformer:
    """Build a :class:`ClipVisionTransformer` from a local Hugging Face CLIP folder.

    The folder contains ``config.json`` and the weights as ``*.safetensors``
    (one file or shards with ``model.safetensors.index.json``). Parameters
    are cast to ``dtype``. The model is returned in eval mode. Raises
    InputError when the folder or files are missing and DataError naming the
    file and tensor when a parameter is missing, unknown or of the wrong shape.
    """
    folder = Path(folder)
    config = read_clip_vision_config(folder)
    tensors = _read_safetensors(folder)

    state: dict[str, torch.Tensor] = {}
    source_names: dict[str, str] = {}
    for hf_name, tensor in tensors.items():
        name = map_hf_clip_vision_name(hf_name)
        if name is not None:
            state[name] = tensor
            source_names[name] = hf_name
    if "projection.weight" not in state and config.projection_dim is not None:
        config = replace(config, projection_dim=None)

    model = ClipVisionTransformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise DataError(
            f"CLIP weights in {folder} are missing {len(missing)} vision parameters (first: {missing[:3]}). "
            "Pass a folder saved from CLIPVisionModel, CLIPVisionModelWithProjection or CLIPModel."
        )
    for name in sorted(state):
        tensor = state[name]
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DataError(
                f"CLIP weights in {folder}: tensor {source_names[name]!r} has shape {tuple(tensor.shape)} but config.json "
                f"implies {tuple(expected[name].shape)}. The weights and config.json do not match."
            )

    model.load_state_dict(state, strict=True)
    model.to(dtype).eval()
    parameter_count = sum(p.numel() for p in model.parameters())
    log.info("loaded CLIP vision transformer from %s: %d layers, width %d, %.1fM parameters", folder, config.num_hidden_layers, config.hidden_size, parameter_count / 1e6)
    return model
