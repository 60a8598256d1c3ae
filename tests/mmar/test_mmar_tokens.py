"""Image tokens and layout: patch grouping, masking, unmasking schedule and the hybrid attention mask."""

from __future__ import annotations

import math

import pytest
import torch

from mmtk.mmar.layout import BOI, EOI, IGNORE_INDEX, IMAGE, PAD, TEXT, build_sequences, hybrid_attention_mask
from mmtk.mmar.tokens import mask_by_order, masked_counts, patchify, random_masks, sample_mask_ratios, unpatchify


def test_patchify_by_hand():
    latents = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    tokens = patchify(latents, 2)
    assert tokens.shape == (1, 4, 4)
    assert tokens[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert tokens[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert tokens[0, 3].tolist() == [10.0, 11.0, 14.0, 15.0]


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_unpatchify_inverts_patchify(patch_size):
    latents = torch.randn(3, 5, 8, 8)
    tokens = patchify(latents, patch_size)
    assert tokens.shape == (3, (8 // patch_size) ** 2, 5 * patch_size**2)
    assert torch.equal(unpatchify(tokens, patch_size, 5, 8, 8), latents)


def test_masked_counts_schedule():
    for num_tokens, iterations in [(256, 64), (16, 16), (16, 4), (64, 8), (10, 1)]:
        counts = masked_counts(num_tokens, iterations)
        assert len(counts) == iterations
        assert counts[-1] == 0
        previous = num_tokens
        for count in counts:
            assert count < previous
            previous = count
    counts = masked_counts(256, 64)
    expected = [math.floor(256 * math.cos(math.pi / 2 * (k + 1) / 64)) for k in range(64)]
    # Early on the schedule reveals less than one token per step, so one is forced; later it is followed exactly.
    assert counts[:3] == [255, 254, 253]
    assert counts[20:60] == expected[20:60]


def test_masked_counts_rejects_too_many_iterations():
    with pytest.raises(ValueError):
        masked_counts(4, 5)


def test_mask_by_order_masks_order_prefix():
    orders = torch.tensor([[3, 1, 0, 2], [0, 1, 2, 3]])
    mask = mask_by_order(torch.tensor([2, 1]), orders)
    assert mask.tolist() == [[False, True, False, True], [True, False, False, False]]


def test_random_masks_count_and_minimum():
    ratios = torch.tensor([0.0, 0.5, 1.0, 0.01])
    mask = random_masks(ratios, 16, torch.Generator().manual_seed(0), min_masked=1)
    assert mask.sum(dim=1).tolist() == [1, 8, 16, 1]


def test_mask_ratio_distributions():
    generator = torch.Generator().manual_seed(0)
    stage_one = sample_mask_ratios(20000, 0.7, 1.0, "truncnorm", generator)
    stage_two = sample_mask_ratios(20000, 0.0, 1.0, "uniform", generator)
    assert stage_one.min().item() >= 0.7
    assert stage_one.max().item() <= 1.0
    # Mean of N(1, 0.25^2) truncated to [0.7, 1]: 1 - 0.25 * (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2)).
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected_mean = 1 - 0.25 * (phi(0) - phi(-1.2)) / (cdf(0) - cdf(-1.2))
    assert stage_one.mean().item() == pytest.approx(expected_mean, abs=0.005)
    assert stage_two.mean().item() == pytest.approx(0.5, abs=0.01)


def test_layout_of_both_tasks():
    batch = build_sequences(["t2i", "i2t"], [[7, 8], [9]], num_image_tokens=3, bos_id=1, eos_id=2)
    assert batch.kinds[0].tolist() == [TEXT, TEXT, TEXT, BOI, IMAGE, IMAGE, IMAGE, EOI]
    assert batch.kinds[1].tolist() == [PAD, BOI, IMAGE, IMAGE, IMAGE, EOI, TEXT, TEXT]
    assert batch.text_ids[0, :3].tolist() == [1, 7, 8]
    assert batch.text_ids[1, 6:].tolist() == [9, 2]
    assert batch.image_start.tolist() == [4, 2]
    assert batch.targets[0].tolist() == [IGNORE_INDEX] * 8
    assert batch.targets[1].tolist() == [IGNORE_INDEX] * 5 + [9, 2, IGNORE_INDEX]
    assert batch.image_positions()[1].tolist() == [2, 3, 4]


def test_attention_mask_semantics():
    batch = build_sequences(["t2i", "i2t"], [[7, 8], [9]], num_image_tokens=3, bos_id=1, eos_id=2)
    mask = hybrid_attention_mask(batch.kinds)
    kinds = batch.kinds
    length = kinds.shape[1]
    for b in range(2):
        image = (kinds[b] == IMAGE).nonzero().flatten().tolist()
        for i in range(length):
            for j in range(length):
                real = kinds[b, i] != PAD and kinds[b, j] != PAD
                if not real:
                    continue
                if i in image and j in image:
                    assert mask[b, i, j], (b, i, j)
                elif j > i:
                    # Text, BOI and EOI never see a later position.
                    assert not mask[b, i, j], (b, i, j)
                else:
                    assert mask[b, i, j], (b, i, j)
    # Padding is never attended, and a padding row sees only itself.
    assert not mask[1, :, 0][1:].any()
    assert mask[1, 0].tolist() == [True] + [False] * (length - 1)
    # The caption of the image-to-text sample sees the whole image.
    assert mask[1, 6, 2:5].all()
    # The text-to-image caption sees no image position.
    assert not mask[0, :3, 4:].any()


def test_causal_image_attention_switch():
    batch = build_sequences(["t2i"], [[7]], num_image_tokens=3, bos_id=1, eos_id=2)
    mask = hybrid_attention_mask(batch.kinds, image_attention="causal")
    assert torch.equal(mask[0], torch.ones(7, 7, dtype=torch.bool).tril())
