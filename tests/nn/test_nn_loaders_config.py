"""Validation of model configs from config.json and GGUF metadata, and of loaded tensor values."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmtk.core.errors import InputError
from mmtk.core.io import write_json
from mmtk.nn.llm import DecoderConfig, DecoderLM
from mmtk.nn.loaders import load_hf_directory
from mmtk.nn.loaders.bundled import hf_config_from
from mmtk.nn.loaders.gguf_file import config_from_gguf


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A Hugging Face-format folder with a random 2-block decoder (no tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny")
    config = DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=64)
    torch.manual_seed(0)
    save_file(DecoderLM(config).state_dict(), str(folder / "model.safetensors"))
    write_json(folder / "config.json", hf_config_from(config))
    return folder


def edited_copy(source, target, **changes):
    """Copy ``source`` into ``target`` with ``changes`` applied to config.json."""
    target.mkdir()
    (target / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


BAD_CONFIGS = {
    "llama3-rope-incomplete": ({"rope_scaling": {"rope_type": "llama3", "factor": 8}}, "needs the key 'low_freq_factor'"),
    "llama3-rope-inverted": ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                                               "original_max_position_embeddings": 32}}, "must be larger than 'low_freq_factor'"),
    "linear-rope-no-factor": ({"rope_scaling": {"rope_type": "linear"}}, "needs the key 'factor'"),
    "rope-theta-text": ({"rope_theta": "abc"}, "rope_theta must be a positive number, got 'abc'"),
    "rope-scaling-list": ({"rope_scaling": [1, 2]}, "rope_scaling must be a JSON object or null, got [1, 2]"),
    "negative-mlp": ({"intermediate_size": -5}, "intermediate_size must be a positive integer, got -5"),
    "zero-heads": ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    "zero-kv-heads": ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    "text-layers": ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer, got '2'"),
    "kv-heads-not-dividing": ({"num_key_value_heads": 3}, "num_heads 4 is not a multiple of num_kv_heads 3"),
    "zero-eps": ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_rejected(tiny_folder, tmp_path, case):
    changes, needle = BAD_CONFIGS[case]
    folder = edited_copy(tiny_folder, tmp_path / case, **changes)

    with pytest.raises(InputError) as raised:
        load_hf_directory(folder)

    assert needle in str(raised.value)
    assert str(folder / "config.json") in str(raised.value)


def test_integral_float_sizes_accepted(tiny_folder, tmp_path):
    folder = edited_copy(tiny_folder, tmp_path / "floats", hidden_size=32.0)
    model, _ = load_hf_directory(folder)
    assert model.config.hidden_size == 32


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_rejected(tiny_folder, tmp_path, value):
    folder = edited_copy(tiny_folder, tmp_path / "bad-values")
    state = load_file(str(folder / "model.safetensors"))
    state["layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(state, str(folder / "model.safetensors"))

    with pytest.raises(InputError) as raised:
        load_hf_directory(folder)

    assert "tensor layers.1.mlp.up_proj.weight contains NaN or infinite values" in str(raised.value)
    assert str(folder / "model.safetensors") in str(raised.value)


def gguf_metadata(**changes) -> dict:
    metadata = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 32,
                "llama.feed_forward_length": 48, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.vocab_size": 40, "llama.context_length": 64}
    metadata.update({f"llama.{key}": value for key, value in changes.items()})
    return metadata


@pytest.mark.parametrize(("changes", "needle"), [
    ({"attention.head_count": 0}, "llama.attention.head_count must be a positive integer, got 0"),
    ({"feed_forward_length": -5}, "llama.feed_forward_length must be a positive integer, got -5"),
    ({"rope.freq_base": "abc"}, "llama.rope.freq_base must be a positive number, got 'abc'"),
    ({"attention.head_count": 5}, "llama.embedding_length 32 is not divisible by llama.attention.head_count 5"),
])
def test_bad_gguf_metadata_rejected(tmp_path, changes, needle):
    path = tmp_path / "model.gguf"
    with pytest.raises(InputError) as raised:
        config_from_gguf(gguf_metadata(**changes), path)

    assert needle in str(raised.value)
    assert str(path) in str(raised.value)


def test_good_gguf_metadata_accepted(tmp_path):
    config = config_from_gguf(gguf_metadata(), tmp_path / "model.gguf")
    assert (config.head_dim, config.num_kv_heads) == (8, 2)


def test_all_finite_survives_sum_overflow():
    from mmtk.nn.loaders.common import all_finite

    large = torch.full((4,), 3e38)
    assert not bool(torch.isfinite(large.sum()))
    assert all_finite(large)
    assert all_finite(torch.full((4,), 60000.0, dtype=torch.float16))
    assert not all_finite(torch.tensor([1.0, math.nan, 2.0], dtype=torch.bfloat16))
    assert not all_finite(torch.tensor([1.0, -math.inf]))
