"""LoRA adapters and per-sample low-rank deltas on the decoder's linear layers."""

from __future__ import annotations

import copy

import pytest
import torch

from mmtk.nn.llm import DecoderConfig, DecoderLM
from mmtk.nn.lora import LowRankDelta, add_lora, lora_parameters, lora_state_dict, merge_lora, sample_deltas, unmerge_lora


def tiny_model(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    return DecoderLM(config).eval()


def ids(batch: int = 3, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(2))


def randomise_adapters(model: DecoderLM) -> None:
    with torch.no_grad():
        for parameter in lora_parameters(model):
            parameter.normal_(std=0.3)


def test_fresh_lora_leaves_output_unchanged():
    model = tiny_model()
    with torch.no_grad():
        before = model(ids()).logits
        add_lora(model, targets=("q_proj", "v_proj", "down_proj"), rank=4)
        after = model(ids()).logits
    assert torch.equal(before, after)


def test_lora_targets_only_chosen_layers():
    model = tiny_model()
    names = add_lora(model, targets=("q_proj", "up_proj"), rank=2, blocks=[1])
    assert names == ["layers.1.mlp.up_proj", "layers.1.self_attn.q_proj"]
    assert set(lora_state_dict(model)) == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))


def test_lora_merge_matches_unmerged_output():
    model = tiny_model()
    add_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"), rank=3, alpha=6.0)
    randomise_adapters(model)
    weight_before = model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        unmerged = model(ids()).logits
        merge_lora(model)
        merged = model(ids()).logits
        unmerge_lora(model)
        again = model(ids()).logits
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert (model.layers[0].self_attn.q_proj.weight - weight_before).abs().max().item() < 1e-6
    assert (again - unmerged).abs().max().item() < 1e-6


def test_lora_update_equals_dense_weight_change():
    model = tiny_model()
    add_lora(model, targets=("v_proj",), rank=2, alpha=4.0)
    randomise_adapters(model)
    reference = tiny_model()
    with torch.no_grad():
        for block, ref_block in zip(model.layers, reference.layers):
            layer = block.self_attn.v_proj
            ref_block.self_attn.v_proj.weight += 2.0 * layer.lora_B @ layer.lora_A  # scaling alpha / rank = 2
        expected = reference(ids()).logits
        actual = model(ids()).logits
    assert (actual - expected).abs().max().item() < 1e-5


def test_lora_trains_adapters_only():
    model = tiny_model()
    add_lora(model, targets=("q_proj", "v_proj"), rank=2)
    frozen = copy.deepcopy(model.layers[0].self_attn.q_proj.weight.detach())
    optimizer = torch.optim.SGD(lora_parameters(model), lr=0.1)
    batch = ids()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, frozen)
    assert model.layers[0].self_attn.q_proj.lora_B.abs().sum().item() > 0


def test_sample_deltas_equal_per_sample_weights():
    model = tiny_model()
    batch = ids(batch=3)
    names = model.linear_names(targets=("q_proj", "down_proj"), blocks=[0, 1])
    generator = torch.Generator().manual_seed(4)
    deltas = {}
    for name in names:
        layer = model.get_submodule(name)
        deltas[name] = LowRankDelta(
            down=torch.randn(3, 2, layer.in_features, generator=generator) * 0.2,
            up=torch.randn(3, layer.out_features, 2, generator=generator) * 0.2,
            scale=0.5,
        )
    with torch.no_grad():
        actual = model(batch, deltas=deltas).logits
        for b in range(3):
            reference = copy.deepcopy(model)
            for name, delta in deltas.items():
                reference.get_submodule(name).weight += delta.scale * delta.up[b] @ delta.down[b]
            expected = reference(batch[b : b + 1]).logits
            assert (actual[b : b + 1] - expected).abs().max().item() < 1e-5, f"sample {b}"
        plain = model(batch).logits
    assert (actual - plain).abs().max().item() > 1e-3
    assert all(layer.sample_delta is None for layer in (model.get_submodule(n) for n in names))


def test_sample_deltas_carry_gradients():
    model = tiny_model()
    layer = model.layers[1].self_attn.v_proj
    down = torch.zeros(2, 2, layer.in_features, requires_grad=True)
    up = torch.full((2, layer.out_features, 2), 0.1, requires_grad=True)
    logits = model(ids(batch=2), deltas={"layers.1.self_attn.v_proj": LowRankDelta(down, up)}).logits
    logits.square().mean().backward()
    assert down.grad is not None
    assert down.grad.abs().sum().item() > 0


def test_sample_deltas_reject_bad_names_and_shapes():
    model = tiny_model()
    layer = model.layers[0].self_attn.q_proj
    good = LowRankDelta(torch.zeros(3, 2, layer.in_features), torch.zeros(3, layer.out_features, 2))
    with pytest.raises(ValueError, match="not an adaptable linear"):
        model(ids(), deltas={"layers.9.self_attn.q_proj": good})
    wrong_batch = LowRankDelta(torch.zeros(2, 2, layer.in_features), torch.zeros(2, layer.out_features, 2))
    with pytest.raises(ValueError, match="batch"):
        model(ids(), deltas={"layers.0.self_attn.q_proj": wrong_batch})
    with pytest.raises(ValueError, match="expected down"):
        with sample_deltas(model, {"layers.0.self_attn.k_proj": good}):
            pass
    assert layer.sample_delta is None


def test_merged_state_dict_round_trip():
    model = tiny_model()
    add_lora(model, targets=("q_proj", "v_proj"), rank=2, alpha=4.0)
    randomise_adapters(model)
    base_weight = model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        expected = model(ids()).logits
        merge_lora(model)
        state = model.state_dict()

    fresh = tiny_model(seed=5)
    add_lora(fresh, targets=("q_proj", "v_proj"), rank=2, alpha=4.0)
    fresh.load_state_dict(state)
    with torch.no_grad():
        reloaded = fresh(ids()).logits
        merge_lora(fresh)
        reloaded_merged = fresh(ids()).logits

    assert torch.equal(state["layers.0.self_attn.q_proj.weight"], base_weight)
    assert (reloaded - expected).abs().max().item() < 1e-5
    assert (reloaded_merged - expected).abs().max().item() < 1e-5


def test_load_into_merged_model():
    source = tiny_model()
    add_lora(source, targets=("v_proj",), rank=2)
    randomise_adapters(source)
    with torch.no_grad():
        expected = source(ids()).logits

    target = tiny_model(seed=3)
    add_lora(target, targets=("v_proj",), rank=2)
    randomise_adapters(target)
    merge_lora(target)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        actual = target(ids()).logits

    assert not target.layers[0].self_attn.v_proj.merged
    assert (actual - expected).abs().max().item() < 1e-5


def test_second_add_lora_keeps_first_trainable():
    model = tiny_model()
    first = add_lora(model, targets=("q_proj",), rank=2)
    second = add_lora(model, targets=("v_proj",), rank=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in first + second for p in ("lora_A", "lora_B")}


def test_bf16_unmerge_restores_weight_exactly():
    model = tiny_model().to(torch.bfloat16)
    add_lora(model, targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0)
    randomise_adapters(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".weight")}
    merge_lora(model)
    merged_weight = model.layers[0].self_attn.q_proj.weight.detach().clone()
    unmerge_lora(model)

    assert not torch.equal(merged_weight, before["layers.0.self_attn.q_proj.weight"])
    for name, parameter in model.named_parameters():
        if name.endswith(".weight"):
            assert torch.equal(parameter, before[name]), name
