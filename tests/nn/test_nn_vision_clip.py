"""CLIP vision transformer against transformers' CLIPVisionModel on tiny random weights."""

from __future__ import annotations

import json

import pytest
import torch

from mmtk.core.errors import DataError, InputError
from mmtk.nn.vision import ClipVisionOutput, load_clip_vision, read_clip_vision_config

transformers = pytest.importorskip("transformers")

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_channels=3,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values so that no LayerNorm or bias is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def tiny_vision_folder(tmp_path_factory):
    """A random tiny CLIPVisionModel saved as config.json + model.safetensors."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**TINY_VISION)
    reference = transformers.CLIPVisionModel(config).eval()
    _randomize(reference, seed=1)
    folder = tmp_path_factory.mktemp("clip_vision")
    reference.save_pretrained(folder, safe_serialization=True)
    return folder, reference


def test_clip_matches_transformers(tiny_vision_folder):
    folder, reference = tiny_vision_folder
    model = load_clip_vision(folder)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        output = model(pixels, output_hidden_states=True)

    assert output.last_hidden_state.shape == (2, 17, 32)
    assert (output.last_hidden_state - expected.last_hidden_state).abs().max().item() < 1e-4
    assert (output.pooled - expected.pooler_output).abs().max().item() < 1e-4
    assert len(output.hidden_states) == len(expected.hidden_states) == 4
    for index, (mine, theirs) in enumerate(zip(output.hidden_states, expected.hidden_states)):
        assert (mine - theirs).abs().max().item() < 1e-4, f"hidden state {index} differs"
    assert output.image_embeds is None


def test_clip_projection_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**TINY_VISION, projection_dim=16)
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    _randomize(reference, seed=3)
    reference.save_pretrained(tmp_path, safe_serialization=True)

    model = load_clip_vision(tmp_path)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(pixel_values=pixels)
        output = model(pixels)

    assert output.image_embeds.shape == (3, 16)
    assert (output.image_embeds - expected.image_embeds).abs().max().item() < 1e-4


def test_clip_loads_full_clip_model(tmp_path):
    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8)
    config = transformers.CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=12)
    reference = transformers.CLIPModel(config).eval()
    _randomize(reference, seed=5)
    reference.save_pretrained(tmp_path, safe_serialization=True)

    model = load_clip_vision(tmp_path)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=pixels)
        output = model(pixels)

    expected_embeds = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert (output.image_embeds - expected_embeds).abs().max().item() < 1e-4


def test_patch_feature_map_layout():
    hidden = torch.arange(2 * 13 * 32, dtype=torch.float32).view(2, 13, 32)
    output = ClipVisionOutput(last_hidden_state=hidden, pooled=hidden[:, 0], grid_size=(3, 4))
    feature_map = output.patch_feature_map()
    assert feature_map.shape == (2, 32, 3, 4)
    # Patch token 1 + (row * 4 + column) sits at (row, column).
    assert torch.equal(feature_map[1, :, 2, 3], hidden[1, 1 + 2 * 4 + 3])


def test_clip_interpolated_positions_match_transformers(tiny_vision_folder):
    folder, reference = tiny_vision_folder
    model = load_clip_vision(folder)
    pixels = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(7))

    with torch.no_grad():
        expected = reference(pixel_values=pixels, interpolate_pos_encoding=True)
        output = model(pixels, interpolate_pos_encoding=True)

    assert output.grid_size == (6, 5)
    assert (output.last_hidden_state - expected.last_hidden_state).abs().max().item() < 1e-4
    assert (output.pooled - expected.pooler_output).abs().max().item() < 1e-4


def test_clip_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_clip_vision(tmp_path / "absent")


def test_clip_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_VISION))
    with pytest.raises(InputError, match="no \\*.safetensors"):
        load_clip_vision(tmp_path)


def test_clip_shape_mismatch_names_tensor(tiny_vision_folder, tmp_path):
    folder, _ = tiny_vision_folder
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())

    with pytest.raises(DataError, match=r"encoder\.layers\.0\.mlp\.fc1\.bias.*\(64,\).*\(48,\)") as error:
        load_clip_vision(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_clip_missing_tensor(tiny_vision_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_vision_folder
    tensors = load_file(folder / "model.safetensors")
    # transformers 4 writes a "vision_model." prefix and transformers 5 does not.
    (key,) = [name for name in tensors if name.endswith("post_layernorm.weight")]
    del tensors[key]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(DataError, match=r"missing 1 vision parameters.*ln_post\.weight"):
        load_clip_vision(tmp_path)


def test_clip_corrupt_safetensors(tiny_vision_folder, tmp_path):
    folder, _ = tiny_vision_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="model.safetensors"):
        load_clip_vision(tmp_path)


def test_clip_rejects_wrong_image_size(tiny_vision_folder):
    folder, _ = tiny_vision_folder
    model = load_clip_vision(folder)
    with pytest.raises(InputError, match="32x32"):
        model(torch.zeros(1, 3, 48, 48))
    with pytest.raises(InputError, match="divisible by the patch size"):
        model(torch.zeros(1, 3, 36, 32), interpolate_pos_encoding=True)
    with pytest.raises(InputError, match="shape"):
        model(torch.zeros(1, 1, 32, 32))


def test_clip_config_from_full_clip_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"projection_dim": 12, "vision_config": TINY_VISION, "text_config": {}}))
    config = read_clip_vision_config(tmp_path)
    assert config.hidden_size == 32
    assert config.projection_dim == 12
    assert config.num_patches == 16
