"""The synthetic shapes data set, pixel tokens, the shapes recipe and its commands end to end."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from mmtk.mmar.shapes import COLOURS, SHAPES, draw_shape, make_shapes, shape_coverage, shapes_tokenizer

TINY_SHAPES = [
    "data.num_images=40", "train.steps=4", "train.batch_size=8", "train.warmup_steps=0", "train.log_every=1", "train.progress=false",
    "train.checkpoint_every=0", "stages=[{until_step: 4, mask_min: 0.0}]",
    "backbone.hidden_size=32", "backbone.num_heads=2", "backbone.intermediate_size=64",
    "model.vit_width=32", "model.vit_heads=2", "model.head_width=32",
    "sample.num_images=2", "sample.num_captions=2", "sample.iterations=2", "sample.steps=3", "sample.caption_tokens=4",
]


def test_shapes_same_seed_same_images():
    first = make_shapes(30, 16, seed=3)
    second = make_shapes(30, 16, seed=3)
    other = make_shapes(30, 16, seed=4)
    assert torch.equal(first.images, second.images)
    assert first.captions == second.captions
    assert not torch.equal(first.images, other.images)


def test_shapes_larger_set_extends_smaller():
    small = make_shapes(10, 16, seed=0)
    large = make_shapes(25, 16, seed=0)
    assert torch.equal(large.images[:10], small.images)
    assert torch.equal(large.shapes[:10], small.shapes)


@pytest.mark.parametrize("shape, area_fraction", [("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5)])
def test_shape_area_matches_geometry(shape, area_fraction):
    size = 10.0
    coverage = shape_coverage(SHAPES.index(shape), 16, (8.0, 8.0), size)
    assert float(coverage.sum()) == pytest.approx(area_fraction * size**2, rel=0.03)


def test_shape_pixels_carry_label_colour():
    image = draw_shape(SHAPES.index("circle"), COLOURS.index("green"), 16, (8.0, 8.0), 10.0)
    assert image[:, 8, 8].tolist() == [-1.0, 1.0, -1.0]
    # Corners lie outside a centred circle, so they keep the grey background (0).
    assert image[:, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert float(image.min()) >= -1.0
    assert float(image.max()) <= 1.0


def test_shapes_texts_name_labels():
    data = make_shapes(20, 16, seed=1)
    for i in range(len(data)):
        shape, colour = SHAPES[int(data.shapes[i])], COLOURS[int(data.colours[i])]
        assert all(shape in caption and colour in caption for caption in data.captions[i])
        assert data.answers[i] == [f"what shape is it? {shape}", f"what colour is it? {colour}"]


def test_shapes_tokenizer_round_trip():
    from mmtk.mmar.data import CaptionVocabulary

    data = make_shapes(50, 16, seed=0)
    texts = [t for i in range(len(data)) for t in data.captions[i] + data.answers[i]]
    vocabulary = CaptionVocabulary.from_captions(shapes_tokenizer(), texts, max_tokens=12)
    for text in texts:
        ids = vocabulary.encode(text)
        assert vocabulary.UNK not in ids
        assert vocabulary.decode(ids) == (text if text.endswith("?") else text + ".")


def test_question_prompt_keeps_question_mark():
    from mmtk.mmar.data import normalise_caption

    assert normalise_caption("what shape  is it?") == "what shape is it?"
    assert normalise_caption("a red circle") == "a red circle."


def test_pixel_tokens_invert_exactly():
    from mmtk.mmar.tokens import PixelTokenizer, image_tokenizer_from_state, image_tokenizer_state, patchify, unpatchify

    images = make_shapes(4, 16, seed=2).images
    tokenizer = PixelTokenizer(scale_factor=2.0)
    tokens = patchify(tokenizer.encode(images).mean * tokenizer.scale_factor, 4)  # (4, 16, 48)
    assert tokens.shape == (4, 16, 48)
    # Token 1 of image 0 is the 4x4 patch at rows 0-3, columns 4-7, channels first.
    assert torch.equal(tokens[0, 1], images[0, :, 0:4, 4:8].reshape(-1) * 2.0)
    rebuilt = image_tokenizer_from_state(image_tokenizer_state(tokenizer))
    decoded = rebuilt.decode(unpatchify(tokens, 4, 3, 16, 16) / rebuilt.scale_factor)
    assert torch.equal(decoded, images)


def test_long_prompt_logs_dropped_tokens(caplog):
    from mmtk.mmar.data import CaptionVocabulary

    vocabulary = CaptionVocabulary.from_captions(shapes_tokenizer(), ["a red circle on grey"], max_tokens=3)
    # The mmtk logger does not propagate to the root logger, so caplog listens on it directly.
    with caplog.at_level(logging.WARNING, logger="mmtk"):
        ids = vocabulary.encode_prompts(["a red", "a red circle on grey"])
    assert [len(i) for i in ids] == [3, 3]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
    # "a red circle on grey." is 6 tokens with the full stop, so 3 are dropped; "a red." fits.
    assert messages == ["prompt 1 has 6 tokens; the model reads only its first 3, so 3 are dropped"]


def test_shapes_recipe_needs_no_files():
    from mmtk.core.recipe import load_recipe
    from mmtk.mmar.recipe import MMARRecipe

    recipe = load_recipe(MMARRecipe, "shapes", tool="train-mmar")
    assert recipe.data.source == "shapes"
    assert recipe.autoencoder.kind == "pixels"
    assert recipe.autoencoder.checkpoint is None
    assert recipe.text.tokenizer == "shapes"
    assert (recipe.autoencoder.resolution // recipe.autoencoder.patch_size) ** 2 == 16


def test_unknown_data_source_exits_2(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train-mmar", "shapes", "--out", out, "data.source=mnist")
    assert result.exit_code == 2
    assert "'coco-mini', 'shapes'" in " ".join(result.output.split())
    assert not out.exists()


def test_unknown_tokenizer_kind_exits_2(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train-mmar", "shapes", "--out", out, "autoencoder.kind=vq")
    assert result.exit_code == 2
    assert "'kl', 'pixels'" in " ".join(result.output.split())
    assert not out.exists()


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A train-mmar shapes run of 4 steps on 40 images."""
    from typer.testing import CliRunner

    from mmtk_commands.main import app

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("shapes") / "run"
    result = CliRunner().invoke(app, ["train-mmar", "shapes", "--out", str(out), "--json", *TINY_SHAPES], catch_exceptions=False)
    torch.set_num_threads(previous_threads)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def test_shapes_run_writes_results(shapes_run):
    out, summary = shapes_run
    assert summary["tokens_per_image"] == 16
    assert summary["token_dim"] == 48
    for name in ("model.pt", "latents.h5", "generated.png", "generated.h5", "captions.jsonl", "summary.json"):
        assert (out / name).is_file(), name


def test_shapes_latent_cache_holds_pixels(shapes_run):
    from mmtk.mmar.data import read_latent_cache

    out, _ = shapes_run
    cache = read_latent_cache(out / "latents.h5")
    data = make_shapes(40, 16, seed=0)
    assert torch.equal(cache.moments[:, :3], data.images)
    assert cache.scale_factor == pytest.approx(1.0 / float(data.images.std()), rel=1e-3)
    assert cache.names[0] == "shape-00000.png"


def test_generate_from_shapes_model(shapes_run, cli, tmp_path):
    import h5py

    out, _ = shapes_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    result = cli("mmar-generate", "default", "--out", tmp_path / "gen", f"checkpoint={out / 'model.pt'}", f"captions={prompts}", "steps=3", "iterations=2", "cfg=2.0")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "gen" / "generated.h5") as handle:
        images = handle["images"][()]
    assert images.shape == (2, 16, 16, 3)
    assert images.dtype == np.uint8


def test_caption_from_shapes_model(shapes_run, cli, tmp_path):
    from PIL import Image

    from mmtk.mmar.data import to_uint8_images

    out, _ = shapes_run
    photo = tmp_path / "circle.png"
    Image.fromarray(to_uint8_images(make_shapes(1, 16, seed=5).images)[0]).save(photo)
    result = cli("mmar-caption", "default", "--out", tmp_path / "cap", f"checkpoint={out / 'model.pt'}", f"images=[{photo}]", "max_tokens=4")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "cap" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["image"] == str(photo)


def test_question_answered_from_shapes_model(shapes_run, cli, tmp_path):
    from PIL import Image

    from mmtk.mmar.data import square_image, to_uint8_images
    from mmtk.mmar.generate import caption_tokens
    from mmtk.mmar.sampling import encode_images_to_tokens, load_mmar
    from mmtk.nn.image import load_image

    out, _ = shapes_run
    photo = tmp_path / "circle.png"
    Image.fromarray(to_uint8_images(make_shapes(1, 16, seed=5).images)[0]).save(photo)
    question = "what shape is it?"
    result = cli("mmar-caption", "default", "--out", tmp_path / "ask", f"checkpoint={out / 'model.pt'}", f"images=[{photo}]", f"question={question}", "max_tokens=2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "ask" / "captions.jsonl").read_text().splitlines()]

    loaded = load_mmar(out / "model.pt", torch.device("cpu"))
    tokens = encode_images_to_tokens(loaded, square_image(load_image(photo), loaded.resolution)[None])
    prefix = loaded.vocabulary.encode(question)
    expected = caption_tokens(loaded.model, tokens, loaded.vocabulary.bos_id, loaded.vocabulary.eos_id, 2, prefixes=[prefix])
    assert rows[0]["question"] == question
    assert rows[0]["answer"] == loaded.vocabulary.decode(expected[0])


def test_empty_question_exits_2(shapes_run, cli, tmp_path):
    out, _ = shapes_run
    result = cli("mmar-caption", "default", "--out", tmp_path / "ask", f"checkpoint={out / 'model.pt'}", "images=[x.png]", "question= ")
    assert result.exit_code == 2
    assert not (tmp_path / "ask").exists()


def test_long_question_exits_2(shapes_run, cli, tmp_path):
    out, _ = shapes_run
    question = " ".join(["what shape is it?"] * 10)
    result = cli("mmar-caption", "default", "--out", tmp_path / "ask", f"checkpoint={out / 'model.pt'}", "images=[x.png]", f"question={question}")
    assert result.exit_code == 2
    assert "recipe key 'question' has" in result.output
    assert not (tmp_path / "ask").exists()


def test_unknown_words_warned(caplog):
    from mmtk.mmar.data import CaptionVocabulary

    vocabulary = CaptionVocabulary(shapes_tokenizer(), None, 12)
    with caplog.at_level(logging.WARNING, logger="mmtk"):
        vocabulary.encode_prompts(["a red circle", "a purple hexagon"])
    warnings = [r.getMessage() for r in caplog.records if "outside the model's vocabulary" in r.getMessage()]
    assert len(warnings) == 1
    assert "prompt 1 ('a purple hexagon') has 2 tokens" in warnings[0]
