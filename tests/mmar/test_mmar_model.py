"""The MMAR model on a fixed batch: both losses fall, a memorised caption regenerates its image, captions come back."""

from __future__ import annotations

import pytest
import torch

from mmtk.mmar.generate import GenerationSettings, caption_tokens, generate_tokens, teacher_forced_completion_error
from mmtk.mmar.layout import build_sequences
from mmtk.mmar.model import MMAR, MMARConfig
from mmtk.mmar.tokens import random_masks
from mmtk.nn.llm import DecoderConfig

BOS, EOS = 1, 2


def tiny_model(parameterisation: str = "v") -> MMAR:
    backbone = DecoderConfig(vocab_size=16, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS)
    config = MMARConfig(
        token_dim=4, num_image_tokens=8, backbone=backbone.to_dict(), vit_width=32, vit_depth=1, vit_heads=2,
        head_width=64, head_depth=2, parameterisation=parameterisation, diffusion_batch_mul=4,
    )
    return MMAR(config)


@pytest.fixture(scope="module")
def memorised():
    """A tiny model trained on 2 images x 2 tasks until it memorises them."""
    # Module fixtures run before the per-test thread setting, and two threads crawl on a loaded machine.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model()
    images = torch.randn(2, 8, 4)
    captions = [[5, 6, 7], [8, 9]]
    tasks = ["t2i", "t2i", "i2t", "i2t"]
    sequences = build_sequences(tasks, captions + captions, 8, BOS, EOS)
    tokens = torch.cat([images, images])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)

    history = []
    for step in range(300):
        mask = torch.zeros(4, 8, dtype=torch.bool)
        mask[:2] = random_masks(torch.rand(2), 8, min_masked=1)
        loss, metrics = model(sequences, tokens, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: float(v) for k, v in metrics.items()})
    torch.set_num_threads(previous_threads)
    return model.eval(), images, captions, history


def test_both_losses_fall_on_fixed_batch(memorised):
    _, _, _, history = memorised
    first_image = sum(h["image_loss"] for h in history[:10]) / 10
    last_image = sum(h["image_loss"] for h in history[-10:]) / 10
    first_text = sum(h["text_loss"] for h in history[:10]) / 10
    last_text = sum(h["text_loss"] for h in history[-10:]) / 10
    assert last_image < 0.5 * first_image
    assert last_text < 0.5 * first_text


def test_memorised_caption_regenerates_image(memorised):
    model, images, captions, _ = memorised
    settings = GenerationSettings(num_iterations=4, num_sampling_steps=50, cfg_scale=1.0, eta=0.0)
    generated = generate_tokens(model, captions, BOS, EOS, settings, torch.Generator().manual_seed(0))
    error = ((generated - images) ** 2).mean().item()
    other = ((generated - images.flip(0)) ** 2).mean().item()
    assert error < 0.3
    assert error < 0.25 * other


def test_memorised_image_is_captioned(memorised):
    model, images, captions, _ = memorised
    assert caption_tokens(model, images, BOS, EOS, max_new_tokens=6) == captions


def test_caption_prefix_continues_memorised_caption(memorised):
    model, images, captions, _ = memorised
    # Given the first word of each memorised caption, the model returns the rest of it, without the prefix.
    assert caption_tokens(model, images, BOS, EOS, max_new_tokens=6, prefixes=[[5], [8]]) == [[6, 7], [9]]


@pytest.mark.parametrize("prediction", ["mean", "sample"])
def test_teacher_forced_error_low_on_memorised_images(memorised, prediction):
    model, images, captions, _ = memorised
    settings = GenerationSettings(num_iterations=4, num_sampling_steps=50, eta=0.0)
    own = teacher_forced_completion_error(model, captions, images, BOS, EOS, settings, torch.Generator().manual_seed(0), prediction=prediction)
    # The same captions with the other image's tokens: the revealed context and the targets no longer fit the caption.
    swapped = teacher_forced_completion_error(model, captions, images.flip(0), BOS, EOS, settings, torch.Generator().manual_seed(0), prediction=prediction)
    assert own.shape == (4,)
    assert float(own.mean()) < 0.3
    assert float(own.mean()) < 0.5 * float(swapped.mean())


def test_teacher_forced_error_rejects_wrong_shape(memorised):
    model, images, captions, _ = memorised
    with pytest.raises(ValueError, match="expected tokens of shape"):
        teacher_forced_completion_error(model, captions, images[:, :4], BOS, EOS, GenerationSettings(num_iterations=2))


def test_image_span_attention_in_model():
    torch.manual_seed(0)
    model = tiny_model().eval()
    sequences = build_sequences(["t2i"], [[5, 6]], 8, BOS, EOS)
    tokens = torch.randn(1, 8, 4)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    changed = tokens.clone()
    changed[0, 7] += 3.0
    with torch.no_grad():
        before = model.hidden_states(sequences, tokens, mask)
        after = model.hidden_states(sequences, changed, mask)
    start = int(sequences.image_start[0])
    # Changing the last image token moves the first image position (bidirectional span) ...
    assert not torch.allclose(before[0, start], after[0, start])
    # ... but not the caption or BOI positions before the image.
    assert torch.allclose(before[0, :start], after[0, :start])


class StubTokenizer:
    vocab_size = 16
    bos_token_id = BOS
    eos_token_id = EOS


def test_lora_trains_adapters_and_image_side_only():
    from mmtk.core.recipe import load_recipe
    from mmtk.mmar.data import CaptionVocabulary
    from mmtk.mmar.recipe import MMARRecipe
    from mmtk.mmar.train import build_model
    from mmtk.nn.lora import add_lora

    overrides = [
        "autoencoder.checkpoint=unused.pt", "backbone.hidden_size=32", "backbone.num_layers=2", "backbone.num_heads=2",
        "backbone.intermediate_size=64", "backbone.lora_rank=4", "backbone.train_embeddings=false",
        "model.vit_width=32", "model.vit_heads=2", "model.head_width=32",
    ]
    recipe = load_recipe(MMARRecipe, "small", overrides, tool="train-mmar")
    model = build_model(recipe, CaptionVocabulary(StubTokenizer(), None), token_dim=4, num_tokens=8)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "backbone.layers.0.self_attn.q_proj.lora_A" in trainable
    assert "backbone.layers.0.self_attn.q_proj.weight" not in trainable
    assert "backbone.embed_tokens.weight" not in trainable
    assert "backbone.layers.1.mlp.up_proj.weight" not in trainable
    assert "diffusion.head.final_layer.linear.weight" in trainable
    assert "vit.mask_token" in trainable
    assert "projector.fc1.weight" in trainable

    # The saved state loads into a fresh model with the same adapters, as mmar-generate rebuilds it.
    rebuilt = MMAR(model.config)
    add_lora(rebuilt.backbone, recipe.backbone.lora_targets, rank=4, freeze_base=False)
    rebuilt.load_state_dict(model.state_dict())


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_recipe_learn_sigma_reaches_head(learn_sigma):
    from mmtk.core.recipe import load_recipe
    from mmtk.mmar.data import CaptionVocabulary
    from mmtk.mmar.recipe import MMARRecipe
    from mmtk.mmar.train import build_model

    recipe = load_recipe(MMARRecipe, "shapes", [f"model.learn_sigma={str(learn_sigma).lower()}"], tool="train-mmar")
    model = build_model(recipe, CaptionVocabulary(StubTokenizer(), None), token_dim=4, num_tokens=8)
    assert model.config.learn_sigma is learn_sigma
    assert model.diffusion.head.out_dim == (8 if learn_sigma else 4)
