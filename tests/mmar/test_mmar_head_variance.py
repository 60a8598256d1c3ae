"""The head with a learned variance: zero init of both halves, hybrid loss on a fixed batch, guidance and saved configs."""

from __future__ import annotations

import pytest
import torch

from mmtk.mmar.head import DiffusionHead, DiffusionLoss


def test_variance_head_outputs_zero_at_init():
    head = DiffusionHead(token_dim=16, cond_dim=32, width=64, depth=2, learn_sigma=True)
    output = head(torch.randn(10, 16), torch.randint(0, 1000, (10,)), torch.randn(10, 32))
    assert output.shape == (10, 32)
    assert torch.count_nonzero(output[:, :16]).item() == 0
    assert torch.count_nonzero(output[:, 16:]).item() == 0


@pytest.mark.parametrize("parameterisation", ["v", "eps", "x0"])
def test_hybrid_loss_falls_on_fixed_batch(parameterisation):
    torch.manual_seed(0)
    loss_module = DiffusionLoss(token_dim=4, cond_dim=8, width=64, depth=2, parameterisation=parameterisation, batch_mul=1, learn_sigma=True)
    tokens = torch.randn(32, 4)
    z = torch.randn(32, 8)
    t = torch.randint(0, 1000, (32,))
    noise = torch.randn(32, 4)
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=3e-3)

    def fixed_terms() -> dict[str, torch.Tensor]:
        head = loss_module.head
        terms = loss_module.diffusion.training_terms(lambda x_t, tt: head(x_t, tt, z), tokens, t, noise)
        return {name: value.mean() for name, value in terms.items()}

    first = {name: value.item() for name, value in fixed_terms().items()}
    for _ in range(150):
        optimizer.zero_grad()
        fixed_terms()["loss"].backward()
        optimizer.step()
    last = {name: value.item() for name, value in fixed_terms().items()}
    assert last["loss"] < 0.5 * first["loss"]
    assert last["vlb"] < first["vlb"]


def test_guidance_keeps_conditional_variance():
    torch.manual_seed(0)
    loss_module = DiffusionLoss(token_dim=3, cond_dim=5, width=32, depth=2, learn_sigma=True)
    for parameter in loss_module.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    z = torch.randn(7, 5)
    z_uncond = torch.randn(7, 5)
    seen: list[torch.Tensor] = []
    original = loss_module.diffusion.sample

    def capture(denoise, noise, *args, **kwargs):
        x_t = torch.randn(7, 3)
        t = torch.full((7,), 500)
        seen.append(denoise(x_t, t))
        seen.append(loss_module.head(x_t, t, z))
        seen.append(loss_module.head(x_t, t, z_uncond))
        return original(denoise, noise, *args, **kwargs)

    loss_module.diffusion.sample = capture
    loss_module.sample(z, z_uncond=z_uncond, cfg_scale=2.5, num_sampling_steps=4)
    guided, cond, uncond = seen
    assert torch.allclose(guided[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]), atol=1e-6)
    assert torch.allclose(guided[:, 3:], cond[:, 3:], atol=1e-6)


def test_variance_head_samples_finite_tokens():
    torch.manual_seed(0)
    loss_module = DiffusionLoss(token_dim=3, cond_dim=5, width=32, depth=2, learn_sigma=True)
    for parameter in loss_module.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    z = torch.randn(9, 5)
    ancestral = loss_module.sample(z, num_sampling_steps=10, eta=1.0, generator=torch.Generator().manual_seed(1))
    deterministic = loss_module.sample(z, num_sampling_steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert ancestral.shape == (9, 3)
    assert bool(torch.isfinite(ancestral).all())
    assert not torch.allclose(ancestral, deterministic, atol=1e-3)


def test_config_without_learn_sigma_loads_as_false():
    from mmtk.mmar.model import MMARConfig, config_from_mapping

    stored = MMARConfig(token_dim=4, num_image_tokens=4).to_dict()
    del stored["learn_sigma"]
    assert config_from_mapping(stored).learn_sigma is False
    assert config_from_mapping({**stored, "learn_sigma": True}).learn_sigma is True


def test_head_size_mismatch_is_rejected(tmp_path):
    from mmtk.core.errors import InputError
    from mmtk.mmar.sampling import HEAD_OUTPUT_WEIGHT, check_head_outputs

    config = {"token_dim": 4, "learn_sigma": True}
    check_head_outputs({"mmar_config": config, "model": {HEAD_OUTPUT_WEIGHT: torch.zeros(8, 16)}}, tmp_path / "model.pt")
    check_head_outputs({"mmar_config": {"token_dim": 4}, "model": {HEAD_OUTPUT_WEIGHT: torch.zeros(4, 16)}}, tmp_path / "model.pt")
    with pytest.raises(InputError, match="learn_sigma True"):
        check_head_outputs({"mmar_config": config, "model": {HEAD_OUTPUT_WEIGHT: torch.zeros(4, 16)}}, tmp_path / "model.pt")
    with pytest.raises(InputError, match="needs 4"):
        check_head_outputs({"mmar_config": {"token_dim": 4}, "model": {HEAD_OUTPUT_WEIGHT: torch.zeros(8, 16)}}, tmp_path / "model.pt")


def test_mmar_with_variance_head_generates():
    from mmtk.mmar.generate import GenerationSettings, generate_tokens
    from mmtk.mmar.layout import build_sequences
    from mmtk.mmar.model import MMAR, MMARConfig
    from mmtk.nn.llm import DecoderConfig

    torch.manual_seed(0)
    backbone = DecoderConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config = MMARConfig(token_dim=4, num_image_tokens=8, backbone=backbone.to_dict(), vit_width=32, vit_depth=1, vit_heads=2, head_width=32, head_depth=1, learn_sigma=True)
    model = MMAR(config)
    assert model.diffusion.head.final_layer.linear.out_features == 8

    sequences = build_sequences(["t2i", "t2i"], [[5, 6], [7]], 8, 1, 2)
    mask = torch.ones(2, 8, dtype=torch.bool)
    loss, metrics = model(sequences, torch.randn(2, 8, 4), mask)
    loss.backward()
    assert bool(torch.isfinite(loss))

    settings = GenerationSettings(num_iterations=4, num_sampling_steps=5, cfg_scale=2.0)
    tokens = generate_tokens(model.eval(), [[5, 6], [7]], 1, 2, settings, torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 8, 4)
    assert bool(torch.isfinite(tokens).all())
