"""Decoder LM against transformers' Llama/Qwen2 and against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmtk.nn.llm import (
    DecoderConfig,
    DecoderLM,
    causal_mask_with_bidirectional_spans,
    rope_inverse_frequencies,
    sample_next_token,
)
from mmtk.nn.loaders import load_hf_directory

transformers = pytest.importorskip("transformers")

VOCAB = 97
TOLERANCE = 1e-4


def tiny_hf_config(kind: str, **extra):
    """Return a random-weight-sized transformers config for a tiny Llama or Qwen2 model."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )
    common.update(extra)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.Qwen2Config(**common)


def save_tiny_model(folder, kind: str, seed: int = 0, **extra):
    """Save a random tiny transformers model as safetensors; return it in eval mode."""
    torch.manual_seed(seed)
    config = tiny_hf_config(kind, **extra)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():
        # Random norms and biases, so a mix-up of these tensors shows in the logits.
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter) if "norm" in name else 0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder, safe_serialization=True)
    return model


VARIANTS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "llama3-rope": ("llama", {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mha": ("llama", {"num_key_value_heads": 4}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model_pair(request, tmp_path_factory):
    """A transformers model and the mmtk decoder loaded from its safetensors folder."""
    kind, extra = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_model(folder, kind, **extra)
    model, _ = load_hf_directory(folder)
    return reference, model


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-main")
    reference = save_tiny_model(folder, "llama", seed=3)
    model, _ = load_hf_directory(folder)
    return reference, model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


# ---- equality with transformers --------------------------------------------------------


def test_logits_match_transformers(model_pair):
    reference, model = model_pair
    ids = random_ids(2, 40)
    with torch.no_grad():
        expected = reference(ids).logits
        actual = model(ids).logits
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < TOLERANCE


def test_hidden_states_match_transformers(llama_pair):
    reference, model = llama_pair
    ids = random_ids(2, 17)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True).hidden_states
        final = model.encode(ids)
        block_inputs = [model.encode(ids, layer=i) for i in range(model.config.num_layers)]
    assert (final - expected[-1]).abs().max().item() < TOLERANCE
    for i, hidden in enumerate(block_inputs):
        assert (hidden - expected[i]).abs().max().item() < TOLERANCE, f"block {i}"


def test_padding_mask_matches_transformers(llama_pair):
    reference, model = llama_pair
    ids = random_ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        actual = model(ids, attention_mask=mask).logits
    assert (actual[0] - expected[0]).abs().max().item() < TOLERANCE
    assert (actual[1, 5:] - expected[1, 5:]).abs().max().item() < TOLERANCE


def test_left_padding_equals_unpadded(llama_pair):
    _, model = llama_pair
    ids = random_ids(1, 9)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        with_padding = model(padded, attention_mask=mask).logits
    assert torch.isfinite(with_padding).all()
    assert (with_padding[:, 4:] - alone).abs().max().item() < TOLERANCE


def test_greedy_generate_matches_transformers(llama_pair):
    reference, model = llama_pair
    ids = random_ids(2, 7, seed=5)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[:, 7:]
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=[])
    assert actual.tolist() == expected.tolist()


# ---- cache, embeddings, masks ----------------------------------------------------------


def test_kv_cache_equals_full_recompute(llama_pair):
    _, model = llama_pair
    ids = random_ids(2, 30)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        pieces = [out.logits]
        cache = out.past_key_values
        out = model(ids[:, 10:17], past_key_values=cache, use_cache=True)  # a chunk after a past
        pieces.append(out.logits)
        for t in range(17, 30):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    stepwise = torch.cat(pieces, dim=1)
    assert cache.get_seq_length() == 30
    assert (stepwise - full).abs().max().item() < TOLERANCE


def test_inputs_embeds_equal_input_ids(llama_pair):
    _, model = llama_pair
    ids = random_ids(2, 11)
    with torch.no_grad():
        from_ids = model(input_ids=ids).logits
        from_embeds = model(inputs_embeds=model.embed_tokens(ids)).logits
    assert torch.equal(from_ids, from_embeds)


def test_forward_rejects_both_inputs(llama_pair):
    _, model = llama_pair
    ids = random_ids(1, 3)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.embed_tokens(ids))


def reference_forward(model: DecoderLM, embeds: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Compute final hidden states with explicit loops and softmax; ``allowed`` is (B, T, T) bool."""
    config = model.config
    batch, length, _ = embeds.shape
    group = config.num_heads // config.num_kv_heads
    positions = torch.arange(length, dtype=torch.float64)
    inv_freq = rope_inverse_frequencies(config).double()

    def rms(x, weight):
        return weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.rms_norm_eps)

    def rotate(x):  # x: (T, hd), rotation of pairs (i, i + hd/2) by angle pos * inv_freq[i]
        half = x.shape[-1] // 2
        angle = positions[:, None] * inv_freq[None, :]
        first, second = x[:, :half], x[:, half:]
        return torch.cat([first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()], dim=-1)

    x = embeds.double()
    for block in model.layers:
        attn = block.self_attn
        h = rms(x, block.input_layernorm.weight)
        q = F.linear(h, attn.q_proj.weight.double(), None if attn.q_proj.bias is None else attn.q_proj.bias.double())
        k = F.linear(h, attn.k_proj.weight.double(), None if attn.k_proj.bias is None else attn.k_proj.bias.double())
        v = F.linear(h, attn.v_proj.weight.double(), None if attn.v_proj.bias is None else attn.v_proj.bias.double())
        out = torch.zeros(batch, length, config.num_heads * config.head_dim, dtype=torch.float64)
        for b in range(batch):
            for head in range(config.num_heads):
                kv_head = head // group
                qh = rotate(q[b, :, head * config.head_dim : (head + 1) * config.head_dim])
                kh = rotate(k[b, :, kv_head * config.head_dim : (kv_head + 1) * config.head_dim])
                vh = v[b, :, kv_head * config.head_dim : (kv_head + 1) * config.head_dim]
                scores = qh @ kh.T / math.sqrt(config.head_dim)
                scores = scores.masked_fill(~allowed[b], float("-inf"))
                out[b, :, head * config.head_dim : (head + 1) * config.head_dim] = torch.softmax(scores, dim=-1) @ vh
        x = x + F.linear(out, attn.o_proj.weight.double())
        h = rms(x, block.post_attention_layernorm.weight)
        mlp = block.mlp
        x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight.double())) * F.linear(h, mlp.up_proj.weight.double()), mlp.down_proj.weight.double())
    return rms(x, model.norm.weight)


def test_bidirectional_span_mask_matches_reference(llama_pair):
    _, model = llama_pair
    ids = random_ids(2, 14)
    embeds = model.embed_tokens(ids).detach()
    mask = causal_mask_with_bidirectional_spans(14, [[(3, 8)], [(0, 4), (9, 14)]])

    expected_mask = torch.ones(14, 14, dtype=torch.bool).tril().repeat(2, 1, 1)
    expected_mask[0, 3:8, 3:8] = True
    expected_mask[1, 0:4, 0:4] = True
    expected_mask[1, 9:14, 9:14] = True
    assert torch.equal(mask, expected_mask)

    with torch.no_grad():
        actual = model.encode(inputs_embeds=embeds, attention_mask=mask)
        actual_4d = model.encode(inputs_embeds=embeds, attention_mask=mask[:, None])
        causal = model.encode(inputs_embeds=embeds)
    expected = reference_forward(model, embeds, mask)
    assert (actual.double() - expected).abs().max().item() < TOLERANCE
    assert torch.equal(actual, actual_4d)
    # Positions before the span see no future, so they equal plain causal attention.
    assert (actual[0, :3] - causal[0, :3]).abs().max().item() < TOLERANCE
    assert (actual[0, 3:8] - causal[0, 3:8]).abs().max().item() > 1e-3


def test_query_subset_mask_matches_reference(llama_pair):
    _, model = llama_pair
    ids = random_ids(1, 10)
    embeds = model.embed_tokens(ids).detach()
    # Positions 6..9 may read the prefix 0..5 and themselves only, not each other.
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    allowed[6:, 6:] = torch.eye(4, dtype=torch.bool)
    with torch.no_grad():
        actual = model.encode(inputs_embeds=embeds, attention_mask=allowed[None])
    expected = reference_forward(model, embeds, allowed[None])
    assert (actual.double() - expected).abs().max().item() < TOLERANCE


def test_queries_over_cached_context(llama_pair):
    _, model = llama_pair
    ids = random_ids(2, 12)
    embeds = model.embed_tokens(ids).detach()
    # Full-sequence reference: positions 8..11 read the context 0..7 and themselves only.
    allowed = torch.ones(12, 12, dtype=torch.bool).tril()
    allowed[8:, 8:] = torch.eye(4, dtype=torch.bool)
    with torch.no_grad():
        expected = model.encode(inputs_embeds=embeds, attention_mask=allowed[None])[:, 8:]
        cache = model(inputs_embeds=embeds[:, :8], use_cache=True).past_key_values
        for _ in range(2):  # the cropped cache serves a second query pass unchanged
            out = model(inputs_embeds=embeds[:, 8:], attention_mask=allowed[None, 8:], past_key_values=cache, use_cache=True, compute_logits=False)
            cache.crop(8)
            assert (out.hidden_states - expected).abs().max().item() < TOLERANCE
    assert cache.get_seq_length() == 8


def test_mask_with_wrong_shape_rejected(llama_pair):
    _, model = llama_pair
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 5, 4, dtype=torch.bool))


def test_rope_frequencies_stay_fp32_in_bf16():
    model = DecoderLM(DecoderConfig(vocab_size=11, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, rope_theta=500000.0))
    model.to(torch.bfloat16)
    expected = rope_inverse_frequencies(model.config)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, expected)


# ---- generation ------------------------------------------------------------------------


def test_generate_stops_at_stop_token(llama_pair):
    _, model = llama_pair
    ids = random_ids(2, 6)
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=10, stop_token_ids=[])
        stop = int(free[0, 3])
        stopped = model.generate(ids, max_new_tokens=10, stop_token_ids=[stop], pad_token_id=0)
    first_stop = free[0].tolist().index(stop)
    assert stopped[0, : first_stop + 1].tolist() == free[0, : first_stop + 1].tolist()
    assert set(stopped[0, first_stop + 1 :].tolist()) <= {0}
    row1 = free[1].tolist()
    if stop in row1:
        assert stopped[1, : row1.index(stop) + 1].tolist() == row1[: row1.index(stop) + 1]
    else:
        assert stopped[1].tolist() == row1


def test_top_p_keeps_only_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, temperature=1.0, top_p=0.7, generator=generator)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_next_token(logits, temperature=1.0, top_p=0.4, generator=generator)) == 0
    assert int(sample_next_token(logits, temperature=0.0)) == 0


def test_sampling_follows_seed(llama_pair):
    _, model = llama_pair
    ids = random_ids(1, 5)
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=8, temperature=1.0, top_p=0.9, stop_token_ids=[], generator=torch.Generator().manual_seed(7))
        second = model.generate(ids, max_new_tokens=8, temperature=1.0, top_p=0.9, stop_token_ids=[], generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


# ---- configuration ---------------------------------------------------------------------


def test_presets_parameter_counts():
    expected = {"smollm2-135m": 134_515_008, "tinyllama-1.1b": 1_100_048_384, "qwen2-0.5b": 494_032_768, "llama2-7b": 6_738_415_616}
    for name, count in expected.items():
        with torch.device("meta"):
            model = DecoderLM(DecoderConfig.preset(name))
        total = sum(p.numel() for p in model.parameters())
        assert total == count, name


def test_config_rejects_unsupported_rope():
    with pytest.raises(ValueError, match="yarn"):
        DecoderConfig(hidden_size=64, num_heads=4, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="multiple"):
        DecoderConfig(hidden_size=64, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("layer", [-1, 4, 1.0])
def test_encode_rejects_layer_out_of_range(llama_pair, layer):
    _, model = llama_pair
    assert model.config.num_layers == 3
    with pytest.raises(ValueError, match=r"layer must be None or an int in 0\.\.3"):
        model.encode(random_ids(1, 4), layer=layer)


def test_encode_last_layer_is_final_output(llama_pair):
    _, model = llama_pair
    ids = random_ids(1, 4)
    with torch.no_grad():
        assert torch.equal(model.encode(ids, layer=3), model.encode(ids))
