"""The adaLN diffusion head: zero init, loss on a fixed batch, guidance and batched sampling."""

from __future__ import annotations

import pytest
import torch

from mmtk.mmar.head import DiffusionHead, DiffusionLoss, timestep_embedding


def test_head_outputs_zero_at_init():
    head = DiffusionHead(token_dim=16, cond_dim=32, width=64, depth=2)
    x_t = torch.randn(10, 16)
    t = torch.randint(0, 1000, (10,))
    z = torch.randn(10, 32)
    output = head(x_t, t, z)
    assert output.shape == (10, 16)
    assert torch.count_nonzero(output).item() == 0


def test_timestep_embedding_by_hand():
    embedding = timestep_embedding(torch.tensor([0, 3]), 4)
    # Frequencies for dim 4 are 1 and 1/100.
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [torch.cos(torch.tensor(3.0)), torch.cos(torch.tensor(0.03)), torch.sin(torch.tensor(3.0)), torch.sin(torch.tensor(0.03))]])
    assert torch.allclose(embedding, expected, atol=1e-6)


@pytest.mark.parametrize("parameterisation", ["v", "eps"])
def test_head_loss_falls_on_fixed_batch(parameterisation):
    torch.manual_seed(0)
    loss_module = DiffusionLoss(token_dim=4, cond_dim=8, width=64, depth=2, parameterisation=parameterisation, batch_mul=1)
    tokens = torch.randn(32, 4)
    z = torch.randn(32, 8)
    t = torch.randint(0, 1000, (32,))
    noise = torch.randn(32, 4)
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=3e-3)

    def fixed_loss() -> torch.Tensor:
        head = loss_module.head
        return loss_module.diffusion.training_loss(lambda x_t, tt: head(x_t, tt, z), tokens, t, noise).mean()

    first = fixed_loss().item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = fixed_loss()
        loss.backward()
        optimizer.step()
    assert fixed_loss().item() < 0.5 * first


def test_weighted_loss_ignores_unselected_tokens():
    torch.manual_seed(0)
    loss_module = DiffusionLoss(token_dim=4, cond_dim=8, width=32, depth=1, batch_mul=2)
    with torch.no_grad():
        loss_module.head.final_layer.linear.bias.fill_(0.5)
    tokens = torch.randn(6, 4)
    z = torch.randn(6, 8)
    weight = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    changed = tokens.clone()
    changed[2:] = 1000.0
    torch.manual_seed(1)
    first = loss_module(tokens, z, weight)
    torch.manual_seed(1)
    second = loss_module(changed, z, weight)
    assert torch.allclose(first, second)
    assert loss_module(tokens, z, torch.zeros(6)).item() == 0.0


def test_guidance_with_equal_conditions_matches_unguided():
    torch.manual_seed(0)
    loss_module = DiffusionLoss(token_dim=3, cond_dim=5, width=32, depth=2)
    for parameter in loss_module.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    z = torch.randn(7, 5)
    plain = loss_module.sample(z, num_sampling_steps=10, generator=torch.Generator().manual_seed(4))
    guided = loss_module.sample(z, z_uncond=z.clone(), cfg_scale=3.0, num_sampling_steps=10, generator=torch.Generator().manual_seed(4))
    other = loss_module.sample(z, z_uncond=torch.zeros_like(z), cfg_scale=3.0, num_sampling_steps=10, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(plain, guided, atol=1e-5)
    assert not torch.allclose(plain, other, atol=1e-3)


def test_batched_sampling_matches_per_token_loop():
    torch.manual_seed(0)
    loss_module = DiffusionLoss(token_dim=3, cond_dim=5, width=32, depth=2)
    for parameter in loss_module.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    z = torch.randn(5, 5)
    batched = loss_module.sample(z, num_sampling_steps=8, eta=0.0, generator=torch.Generator().manual_seed(0))
    noise = torch.randn((5, 3), generator=torch.Generator().manual_seed(0))
    for i in range(5):
        head = loss_module.head
        single = loss_module.diffusion.sample(lambda x_t, t: head(x_t, t, z[i : i + 1]), noise[i : i + 1], 8)
        assert torch.allclose(single, batched[i : i + 1], atol=1e-5)
