"""Head-only density fit: a v-prediction head samples a 4-class mixture well, an eps head on the same budget does not."""

from __future__ import annotations

import pytest
import torch

from mmtk.mmar.head import DiffusionLoss


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 64, seed: int = 0) -> float:
    directions = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa = (a @ directions).sort(dim=0).values
    pb = (b @ directions).sort(dim=0).values
    return float((pa - pb).abs().mean())


def mixture(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.tensor([[1.5, 1.5, 0.0, 0.0], [-1.5, 1.5, 0.5, 0.0], [1.5, -1.5, 0.0, -0.5], [-1.5, -1.5, -0.5, 0.5]])
    labels = torch.randint(0, 4, (n,), generator=generator)
    points = means[labels] + 0.3 * torch.randn(n, 4, generator=generator)
    return points, torch.nn.functional.one_hot(labels, 4).float()


def fit_and_sample(parameterisation: str, steps: int = 3000) -> float:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    loss_module = DiffusionLoss(token_dim=4, cond_dim=4, width=128, depth=3, parameterisation=parameterisation, batch_mul=4)
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        points, condition = mixture(256, generator)
        loss = loss_module(points, condition)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    points, condition = mixture(4000, generator)
    samples = loss_module.sample(condition, num_sampling_steps=25, eta=0.0, generator=torch.Generator().manual_seed(1))
    return sliced_wasserstein(samples, points)


@pytest.mark.slow
def test_v_head_fits_mixture_eps_head_does_not():
    v_distance = fit_and_sample("v")
    eps_distance = fit_and_sample("eps")
    assert v_distance < 0.1
    assert eps_distance > 3 * v_distance
