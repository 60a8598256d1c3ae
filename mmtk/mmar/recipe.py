"""Recipe of ``mmtk train-mmar``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from mmtk.core.recipe import param
from mmtk.core.trainer import TrainConfig


@dataclass
class MMARData:
    """Captioned photos and how they become training samples."""

    source: Literal["coco-mini", "shapes"] = param("coco-mini", help="coco-mini: the photos in data.images; shapes: synthetic coloured shapes drawn from the seed (no data folder)")
    num_images: int = param(2000, min=1, help="synthetic images drawn when data.source is shapes")
    images: Path = param(Path("../shared/data/coco-mini"), help="folder with captions.jsonl and images/ (coco-mini layout)")
    heldout_every: int = param(10, min=0, help="every n-th image in image-id order is held out for generation prompts and captioning (0: none)")
    latent_cache: Optional[Path] = param(None, help="an existing latent cache (HDF5) to reuse; null encodes the photos into latents.h5 in the run folder")
    t2i_fraction: float = param(0.5, min=0.0, max=1.0, help="fraction of each micro-batch that is text-to-image; the rest is image-to-text")
    caption_dropout: float = param(0.1, min=0.0, max=1.0, help="probability that a text-to-image caption is replaced by the empty prompt (for classifier-free guidance)")
    flip: bool = param(True, help="use the mirrored image's latents half of the time")


@dataclass
class MMARAutoencoder:
    """The frozen image tokenizer."""

    kind: Literal["kl", "pixels"] = param("kl", help="kl: a KL autoencoder; pixels: raw p x p x 3 pixel patches scaled to unit std")
    checkpoint: Optional[Path] = param(None, help="autoencoder.pt written by mmtk train-kl-autoencoder")
    weights: Optional[Path] = param(None, help="local LDM KL-16 weights (.ckpt or .safetensors); used when checkpoint is null")
    resolution: int = param(64, min=8, help="image size in px (256 for LDM KL-16)")
    scale_factor: Optional[float] = param(None, help="latent scale; null takes the checkpoint's value (or estimates it for KL-16 weights; MAR uses 0.2325)")
    patch_size: int = param(2, min=1, help="latent patch grouping p: one token contains p x p latent pixels (MAR: 1)")


@dataclass
class MMARText:
    """Caption tokenizer."""

    tokenizer: str = param("bundled", help="'bundled' for SmolLM2-135M's tokenizer, or a Hugging Face-format folder")
    compact_vocab: bool = param(True, help="keep only the token ids seen in training captions (small output layer)")
    max_tokens: int = param(32, min=1, help="caption tokens kept per caption")


@dataclass
class MMARBackbone:
    """The decoder LM."""

    pretrained: Optional[str] = param(None, help="null (random init), 'bundled' (SmolLM2-135M-Instruct) or a local Hugging Face / GGUF model")
    keep_layers: Optional[int] = param(None, min=1, help="keep only the first n blocks of a pretrained decoder (null: all)")
    hidden_size: int = param(192, min=8, help="width of a randomly initialised decoder")
    num_layers: int = param(4, min=1, help="blocks of a randomly initialised decoder")
    num_heads: int = param(6, min=1, help="attention heads of a randomly initialised decoder")
    num_kv_heads: Optional[int] = param(None, min=1, help="key/value heads (null: num_heads)")
    intermediate_size: int = param(512, min=1, help="SwiGLU hidden width of a randomly initialised decoder")
    lora_rank: int = param(0, min=0, help="LoRA rank on the decoder (0: no LoRA, all decoder weights train)")
    lora_alpha: Optional[float] = param(None, help="LoRA scale numerator (null: the rank)")
    lora_targets: list[str] = param(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], help="decoder linears that get LoRA")
    train_embeddings: bool = param(True, help="with LoRA, still train the token embeddings and output layer")


@dataclass
class MMARModel:
    """Image-side modules and the diffusion head."""

    vit_width: int = param(192, min=8, help="EmbeddingViT width")
    vit_depth: int = param(2, min=0, help="EmbeddingViT blocks")
    vit_heads: int = param(4, min=1, help="EmbeddingViT heads")
    head_width: int = param(256, min=8, help="diffusion head width (MAR: 1024)")
    head_depth: int = param(3, min=1, help="diffusion head residual blocks (MAR: 3)")
    pred: Literal["v", "eps", "x0"] = param("v", help="what the head predicts: v (the stable default), eps or x0")
    learn_sigma: bool = param(True, help="also learn the reverse-step variance (MAR's 2 x token_dim head output, trained with the hybrid loss); DDPM sampling (eta 1) uses it")
    diffusion_steps: int = param(1000, min=2, help="training timesteps of the cosine schedule")
    diffusion_batch_mul: int = param(4, min=1, help="noise draws per token per step")
    image_attention: Literal["bidirectional", "causal"] = param("bidirectional", help="attention among the image tokens")


@dataclass
class MMARStage:
    """A training stage: mask ratios for steps before ``until_step``."""

    until_step: int = param(min=1, help="the stage covers optimizer steps before this one")
    mask_min: float = param(min=0.0, max=1.0, help="lowest image mask ratio")
    mask_max: float = param(1.0, min=0.0, max=1.0, help="highest image mask ratio")
    distribution: Literal["truncnorm", "uniform"] = param("uniform", help="truncnorm: N(1, 0.25^2) truncated to the range; uniform")


@dataclass
class MMARLoss:
    """Weights of the two losses."""

    image_weight: float = param(1.0, min=0.0, help="weight of the diffusion loss of masked image tokens")
    text_weight: float = param(1.0, min=0.0, help="weight of the caption cross-entropy")


@dataclass
class MMARSample:
    """Generation and captioning after training (also the defaults of mmar-generate)."""

    num_images: int = param(16, min=0, help="images generated from held-out captions at the end (0: none)")
    num_captions: int = param(16, min=0, help="held-out photos captioned at the end (0: none)")
    iterations: int = param(8, min=1, help="masked-autoregressive iterations")
    steps: int = param(50, min=1, help="diffusion sampling steps per iteration")
    cfg: float = param(3.0, min=0.0, help="classifier-free guidance scale (1: none)")
    cfg_schedule: Literal["linear", "constant"] = param("linear", help="guidance scale rising with the revealed fraction, or constant")
    temperature: float = param(1.0, min=0.0, help="noise temperature of the diffusion sampler")
    eta: float = param(1.0, min=0.0, max=1.0, help="1: ancestral DDPM steps, 0: DDIM")
    caption_tokens: int = param(24, min=1, help="maximum generated caption length")


@dataclass
class MMARTrain(TrainConfig):
    """Training defaults of the CPU recipe (MAR: AdamW (0.9, 0.95), weight decay 0.02, clip 3)."""

    steps: int = param(600, min=1, help="optimizer steps")
    batch_size: int = param(16, min=1, help="global batch size")
    lr: float = param(1e-3, min=0.0, help="peak learning rate")
    betas: tuple[float, ...] = param((0.9, 0.95), help="AdamW's (beta1, beta2)")
    weight_decay: float = param(0.02, min=0.0, help="decoupled weight decay")
    warmup_steps: int = param(30, min=0, help="linear warm-up steps")
    grad_clip: float = param(3.0, min=0.0, help="gradient-norm clip")
    log_every: int = param(20, min=1, help="steps between metric records")
    checkpoint_every: int = param(200, min=0, help="steps between checkpoints")


@dataclass
class MMARRecipe:
    """Recipe of ``mmtk train-mmar``."""

    seed: int = param(0, help="random seed")
    device: str = param("cpu", help="torch device: cpu, cuda, cuda:1 or auto")
    threads: int = param(0, min=0, help="torch CPU threads (0 keeps torch's default)")
    data: MMARData = field(default_factory=MMARData)
    autoencoder: MMARAutoencoder = field(default_factory=MMARAutoencoder)
    text: MMARText = field(default_factory=MMARText)
    backbone: MMARBackbone = field(default_factory=MMARBackbone)
    model: MMARModel = field(default_factory=MMARModel)
    stages: list[MMARStage] = param(
        default_factory=lambda: [MMARStage(until_step=300, mask_min=0.7, mask_max=1.0, distribution="truncnorm"), MMARStage(until_step=600, mask_min=0.0, mask_max=1.0, distribution="uniform")],
        help="mask-ratio stages in step order; the last must reach train.steps",
    )
    loss: MMARLoss = field(default_factory=MMARLoss)
    train: MMARTrain = field(default_factory=MMARTrain)
    sample: MMARSample = field(default_factory=MMARSample)

    def __post_init__(self) -> None:
        previous = 0
        for index, stage in enumerate(self.stages):
            if stage.until_step <= previous:
                raise ValueError(f"stages[{index}].until_step={stage.until_step} must exceed the previous stage's {previous}")
            if stage.mask_min > stage.mask_max:
                raise ValueError(f"stages[{index}] has mask_min {stage.mask_min} > mask_max {stage.mask_max}")
            previous = stage.until_step
        if not self.stages or previous < self.train.steps:
            raise ValueError(f"the stages end at step {previous} but train.steps is {self.train.steps}; extend the last stage's until_step")
        if self.autoencoder.kind == "kl" and self.autoencoder.checkpoint is None and self.autoencoder.weights is None:
            raise ValueError("set autoencoder.checkpoint (from mmtk train-kl-autoencoder) or autoencoder.weights (LDM KL-16)")
