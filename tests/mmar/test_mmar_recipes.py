"""Bundled MMAR recipes load and validate; invalid stage lists are rejected."""

from __future__ import annotations

import pytest

from mmtk.core.errors import RecipeError
from mmtk.core.recipe import load_recipe
from mmtk.mmar.kl_autoencoder import AutoencoderRecipe
from mmtk.mmar.recipe import MMARRecipe
from mmtk.mmar.sampling import CaptionRecipe, GenerateRecipe


def test_small_recipe_stages():
    recipe = load_recipe(MMARRecipe, "small", tool="train-mmar")
    assert [s.mask_min for s in recipe.stages] == [0.7, 0.0]
    assert [s.distribution for s in recipe.stages] == ["truncnorm", "uniform"]
    assert recipe.stages[-1].until_step == recipe.train.steps
    assert recipe.model.pred == "v"


def test_paper_recipe_matches_mar_settings():
    recipe = load_recipe(MMARRecipe, "paper", tool="train-mmar")
    assert recipe.autoencoder.scale_factor == pytest.approx(0.2325)
    assert recipe.autoencoder.patch_size == 1
    assert recipe.model.head_width == 1024
    assert recipe.model.head_depth == 3
    assert recipe.train.betas == (0.9, 0.95)
    assert recipe.sample.iterations == 64


def test_other_bundled_recipes_load():
    assert load_recipe(AutoencoderRecipe, "small", tool="train-kl-autoencoder").data.resolution == 64
    assert load_recipe(GenerateRecipe, "default", tool="mmar-generate").checkpoint is None
    assert load_recipe(CaptionRecipe, "default", tool="mmar-caption").images == []


@pytest.mark.parametrize("stages, message", [
    ("[{until_step: 100, mask_min: 0.7}]", "extend the last stage"),
    ("[{until_step: 500, mask_min: 0.7}, {until_step: 400, mask_min: 0.0}]", "must exceed the previous stage"),
    ("[{until_step: 800, mask_min: 0.9, mask_max: 0.5}]", "mask_min 0.9 > mask_max 0.5"),
])
def test_invalid_stages_rejected(stages, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(MMARRecipe, "small", [f"stages={stages}"], tool="train-mmar")
