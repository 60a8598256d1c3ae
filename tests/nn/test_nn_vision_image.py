"""Image loading and preprocessing: hand-computed cases and PIL as a reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmtk.core.errors import DataError, InputError
from mmtk.nn.image import (
    ImagePreprocessor,
    center_crop,
    check_batch,
    list_offline_photos,
    load_image,
    load_offline_photo,
    load_offline_photos,
    normalize,
    resize,
    resize_shorter_side,
    to_float,
)


def test_to_float_scales_uint8():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(pixels), torch.tensor([0.0, 0.2, 1.0]))


def test_to_float_rejects_integer_dtype():
    with pytest.raises(InputError, match="int64"):
        to_float(torch.zeros(3, dtype=torch.int64))


def test_to_float_rejects_minus_one_range():
    with pytest.raises(InputError, match=r"\(x \+ 1\) / 2"):
        to_float(torch.tensor([-1.0, 0.0, 1.0]))


def test_center_crop_window():
    images = torch.arange(4 * 5, dtype=torch.float32).view(1, 1, 4, 5)
    cropped = center_crop(images, (2, 2))
    # Rows 1-2 and columns 1-2 of the 4 x 5 grid: the odd extra column goes at the right.
    assert cropped[0, 0].tolist() == [[6.0, 7.0], [11.0, 12.0]]


def test_center_crop_too_large():
    with pytest.raises(InputError, match="does not fit"):
        center_crop(torch.zeros(1, 3, 4, 4), (5, 5))


def test_normalize_values():
    images = torch.full((1, 3, 1, 1), 0.5)
    out = normalize(images, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    expected = [(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    assert torch.allclose(out.flatten(), torch.tensor(expected))


def test_resize_bilinear_upsample_by_hand():
    row = torch.tensor([[[[0.0, 1.0]]]])  # (1, 1, 1, 2)
    out = resize(row, (1, 4))
    # Output pixel centres map to source x = -0.25, 0.25, 0.75, 1.25; the outer two clamp to the edges.
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))


@pytest.mark.parametrize("size", [(16, 20), (10, 31), (37, 80)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_matches_pil(size, interpolation):
    rng = np.random.default_rng(0)
    # Values in [0.25, 0.75] so that bicubic overshoot never reaches the [0, 1] clamp.
    plane = (0.25 + 0.5 * rng.random((37, 53))).astype(np.float32)
    pil_filter = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC
    expected = np.asarray(Image.fromarray(plane, mode="F").resize((size[1], size[0]), pil_filter))

    out = resize(torch.from_numpy(plane)[None, None], size, interpolation)[0, 0].numpy()
    assert np.abs(out - expected).max() < 1e-5


def test_resize_shorter_side_keeps_aspect():
    out = resize_shorter_side(torch.zeros(1, 3, 40, 100), 20)
    assert out.shape == (1, 3, 20, 50)


def test_preprocessor_hand_computed():
    image = np.array(
        [
            [[0, 0, 0], [51, 51, 51], [102, 102, 102], [255, 255, 255]],
            [[255, 0, 0], [0, 255, 0], [0, 0, 255], [204, 204, 204]],
        ],
        dtype=np.uint8,
    )  # (H=2, W=4, 3)
    preprocess = ImagePreprocessor(size=2, resize_mode="shorter_side", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batch = preprocess([image])

    # Shorter side is already 2, so only the crop of columns 1-2 and (x / 255 - 0.5) / 0.5 remain.
    assert batch.shape == (1, 3, 2, 2)
    red = [[51 / 255 * 2 - 1, 102 / 255 * 2 - 1], [-1.0, -1.0]]
    green = [[51 / 255 * 2 - 1, 102 / 255 * 2 - 1], [1.0, -1.0]]
    blue = [[51 / 255 * 2 - 1, 102 / 255 * 2 - 1], [-1.0, 1.0]]
    assert torch.allclose(batch[0, 0], torch.tensor(red))
    assert torch.allclose(batch[0, 1], torch.tensor(green))
    assert torch.allclose(batch[0, 2], torch.tensor(blue))


def test_preprocessor_batches_mixed_sizes():
    preprocess = ImagePreprocessor(size=8)
    images = [np.zeros((10, 20, 3), np.uint8), torch.full((3, 30, 12), 255, dtype=torch.uint8), np.zeros((9, 9), np.uint8)]
    batch = preprocess(images)
    assert batch.shape == (3, 3, 8, 8)
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    assert torch.allclose(batch[1], ((1.0 - mean) / std).expand(3, 8, 8))


def test_preprocessor_single_image_is_batch_of_one():
    preprocess = ImagePreprocessor(size=4)
    array = np.full((6, 10, 3), 255, dtype=np.uint8)
    from_array = preprocess(array)
    from_tensor = preprocess(torch.from_numpy(array).permute(2, 0, 1))
    assert from_array.shape == (1, 3, 4, 4)
    assert torch.equal(from_array, from_tensor)


def test_preprocessor_rejects_four_channels():
    with pytest.raises(InputError, match="image 0 has shape"):
        ImagePreprocessor()([np.zeros((10, 10, 4), np.uint8)])


def test_check_batch_rejects_one_channel():
    with pytest.raises(InputError, match="1 channels"):
        check_batch(torch.zeros(2, 1, 8, 8))


def test_check_batch_rejects_nan():
    images = torch.zeros(1, 3, 2, 2)
    images[0, 1, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        check_batch(images)


def test_preprocessor_rejects_unknown_mode():
    with pytest.raises(InputError, match="resize_mode"):
        ImagePreprocessor(resize_mode="pad")


def test_load_image_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "gray.png")

    loaded = load_image(tmp_path / "photo.png")
    assert loaded.dtype == torch.uint8
    assert torch.equal(loaded, torch.from_numpy(pixels).permute(2, 0, 1))
    gray = load_image(tmp_path / "gray.png")
    assert gray.shape == (3, 5, 7)
    assert torch.equal(gray[0], gray[2])
    assert torch.equal(gray[1], torch.from_numpy(pixels[:, :, 0]))


def test_load_image_corrupt_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG body")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(path)


def test_load_image_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png"):
        load_image(path)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "absent.png")


def test_offline_photos_include_known_images():
    names = list_offline_photos()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        assert name in names
    photos = load_offline_photos(include_grayscale=True)
    assert photos["coffee"].shape == (400, 600, 3)
    assert photos["camera"].shape == (512, 512, 3)
    assert all(photo.dtype == np.uint8 for photo in photos.values())


def test_offline_photo_unknown_name():
    with pytest.raises(InputError, match="unknown scikit-image photo"):
        load_offline_photo("lena")
