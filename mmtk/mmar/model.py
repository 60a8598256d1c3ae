"""The MMAR model: latent tokens -> EmbeddingViT -> VisProjector -> decoder LM -> diffusion head / LM head.

One decoder runs both tasks. For text to image, the hidden state at each
image position conditions that token's diffusion head; masked positions
carry the learned mask embedding. For image to text, the caption tokens read
the clean image positions (no token masked) through causal attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtk.core.logging import get_logger
from mmtk.mmar.head import DiffusionLoss
from mmtk.mmar.layout import BOI, EOI, IGNORE_INDEX, TEXT, SequenceBatch, hybrid_attention_mask
from mmtk.nn.llm import DecoderConfig, DecoderLM

log = get_logger(__name__)

@dataclass
class MMARConfig:
    """Sizes of the MMAR modules around the decoder.

    Attributes:
        token_dim: D, size of one image token (latent channels x patch^2).
        num_image_tokens: N, image tokens per image.
        backbone: the decoder's :class:`DecoderConfig` as a mapping.
        vit_width, vit_depth, vit_heads: the EmbeddingViT.
        head_width, head_depth: the diffusion head MLP.
        parameterisation: what the head predicts: "v", "eps" or "x0".
        learn_sigma: the head also outputs the reverse-step variance (2 D
            outputs, hybrid loss). False for configs saved before it existed.
        diffusion_steps: training timesteps T of the cosine schedule.
        diffusion_batch_mul: noise draws per token per training step.
        image_attention: "bidirectional" or "causal" inside the image span.
    """

    token_dim: int
    num_image_tokens: int
    backbone: dict[str, Any] = field(default_factory=dict)
    vit_width: int = 256
    vit_depth: int = 2
    vit_heads: int = 4
    head_width: int = 256
    head_depth: int = 3
    parameterisation: str = "v"
    learn_sigma: bool = False
    diffusion_steps: int = 1000
    diffusion_batch_mul: int = 4
    image_attention: str = "bidirectional"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block with bidirectional multi-head self-attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"EmbeddingViT width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, w/h)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class EmbeddingViT(nn.Module):
    """Small bidirectional ViT over latent tokens; masked tokens enter as a learned mask embedding."""

    def __init__(self, token_dim: int, num_tokens: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.token_proj = nn.Linear(token_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.zeros(num_tokens, width))
        self.blocks = nn.ModuleList([ViTBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D), mask (B, N) bool with True = masked -> (B, N, width)."""
        x = self.token_proj(tokens)  # (B, N, W)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisProjector(nn.Module):
    """Two-layer MLP from the EmbeddingViT width to the decoder width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MMAR(nn.Module):
    """The full model; ``forward`` returns the training loss of one batch.

    Args:
        config: module sizes (see :class:`MMARConfig`).
        backbone: an existing decoder (for example with pretrained weights);
            built from ``config.backbone`` when None.
    """

    def __init__(self, config: MMARConfig, backbone: DecoderLM | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else DecoderLM(DecoderConfig.from_dict(config.backbone))
        hidden = self.backbone.config.hidden_size
        self.vit = EmbeddingViT(config.token_dim, config.num_image_tokens, config.vit_width, config.vit_depth, config.vit_heads)
        self.projector = VisProjector(config.vit_width, hidden)
        self.boi_embed = nn.Parameter(torch.randn(hidden) * 0.02)
        self.eoi_embed = nn.Parameter(torch.randn(hidden) * 0.02)
        self.diffusion_pos_embed = nn.Parameter(torch.randn(config.num_image_tokens, hidden) * 0.02)
        self.diffusion = DiffusionLoss(
            config.token_dim, hidden, config.head_width, config.head_depth,
            parameterisation=config.parameterisation, num_steps=config.diffusion_steps, batch_mul=config.diffusion_batch_mul,
            learn_sigma=config.learn_sigma,
        )
        log.debug(
            "MMAR: %d image tokens of dimension %d, decoder width %d, head %dx%d (pred %s, learn_sigma %s), %d parameters",
            config.num_image_tokens, config.token_dim, hidden, config.head_depth, config.head_width, config.parameterisation, config.learn_sigma,
            sum(p.numel() for p in self.parameters()),
        )

    # ------------------------------------------------------------ backbone

    def embed(self, sequences: SequenceBatch, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Build the decoder input (B, L, H) from text ids, BOI/EOI embeddings and image tokens (B, N, D)."""
        kinds = sequences.kinds
        x = self.backbone.embed_tokens(sequences.text_ids)  # (B, L, H)
        x = x * (kinds == TEXT)[..., None].to(x.dtype)
        x = torch.where((kinds == BOI)[..., None], self.boi_embed.to(x.dtype), x)
        x = torch.where((kinds == EOI)[..., None], self.eoi_embed.to(x.dtype), x)

        image = self.projector(self.vit(tokens, mask))  # (B, N, H)
        positions = sequences.image_positions()  # (B, N)
        index = positions[..., None].expand(-1, -1, x.shape[-1])
        return x.scatter(1, index, image.to(x.dtype))

    def hidden_states(self, sequences: SequenceBatch, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the decoder under the hybrid attention mask; returns (B, L, H)."""
        inputs = self.embed(sequences, tokens, mask)
        attention = hybrid_attention_mask(sequences.kinds, self.config.image_attention)
        return self.backbone.encode(inputs_embeds=inputs, attention_mask=attention)

    def image_conditions(self, sequences: SequenceBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Gather the head conditions z at the image positions: (B, N, H)."""
        positions = sequences.image_positions()
        index = positions[..., None].expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index) + self.diffusion_pos_embed.to(hidden.dtype)

    # ------------------------------------------------------------ training

    def forward(self, sequences: SequenceBatch, tokens: torch.Tensor, mask: torch.Tensor, image_weight: float = 1.0, text_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(loss, metrics)`` for a batch.

        Args:
            sequences: the layout of the batch.
            tokens: (B, N, D) clean image tokens.
            mask: (B, N) bool, True where the token is masked; the diffusion
                loss covers masked tokens only (none in image-to-text samples).
            image_weight, text_weight: weights of the diffusion loss and the
                caption cross-entropy in the total.
        """
        hidden = self.hidden_states(sequences, tokens, mask)  # (B, L, H)

        z = self.image_conditions(sequences, hidden)  # (B, N, H)
        # The head runs on masked tokens only (R of B*N), the rows that carry loss; all-ones weights give 0 when R = 0.
        image_loss = self.diffusion(tokens[mask], z[mask], mask[mask].float())  # tokens (R, D), z (R, H)

        text_rows = sequences.targets != IGNORE_INDEX  # (B, L)
        logits = self.backbone.lm_head(hidden[text_rows]).float()  # (M, V)
        if logits.shape[0] > 0:
            text_loss = F.cross_entropy(logits, sequences.targets[text_rows])
        else:
            text_loss = logits.sum()

        loss = image_weight * image_loss + text_weight * text_loss
        metrics = {"image_loss": image_loss.detach(), "text_loss": text_loss.detach(), "mask_ratio": mask.float().mean().detach()}
        return loss, metrics


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def config_from_mapping(values: Mapping[str, Any]) -> MMARConfig:
    """Rebuild an :class:`MMARConfig` from :meth:`MMARConfig.to_dict` output.

    A mapping without ``learn_sigma`` (saved before the option existed)
    gets False, the head those models were trained with.
    """
    return MMARConfig(**{"learn_sigma": False, **dict(values)})
