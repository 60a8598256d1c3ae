"""Recipe loading: types, bounds, unknown keys, overrides and bundled names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from mmtk.core.errors import RecipeError
from mmtk.core.recipe import apply_overrides, build, dump_yaml, load_recipe, param, read_yaml_mapping


@dataclass
class Optim:
    lr: float = param(1e-3, min=0.0, min_exclusive=True, help="learning rate")
    epochs: int = param(10, min=1)
    method: Literal["adam", "sgd"] = "adam"


@dataclass
class Toy:
    name: str = param(help="run name")
    seed: int = 0
    optim: Optim = field(default_factory=Optim)
    species: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    data: Optional[Path] = None


def test_build_nested_and_defaults():
    recipe = build(Toy, {"name": "a", "optim": {"lr": "3e-4"}, "species": ["H2", "O2"]})
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.optim.epochs == 10
    assert recipe.species == ["H2", "O2"]
    assert recipe.data is None


@dataclass
class WithToolDefaults:
    optim: Optim = field(default_factory=lambda: Optim(lr=0.01, method="sgd"))


def test_partial_section_keeps_factory_defaults():
    recipe = build(WithToolDefaults, {"optim": {"epochs": 3}})
    assert recipe.optim.method == "sgd"
    assert recipe.optim.lr == 0.01
    assert recipe.optim.epochs == 3


def test_integer_written_in_exponent_form():
    assert build(Toy, {"name": "a", "optim": {"epochs": "1e6"}}).optim.epochs == 1_000_000


def test_unknown_key_names_path_and_suggestion():
    with pytest.raises(RecipeError) as info:
        build(Toy, {"name": "a", "optim": {"lrr": 1.0}})
    message = str(info.value)
    assert "optim.lrr" in message
    assert "Did you mean 'lr'" in message


def test_missing_required_key():
    with pytest.raises(RecipeError, match="missing recipe key 'name'"):
        build(Toy, {})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"name": "a", "optim": {"lr": 0.0}}, "'optim.lr': 0.0 is out of range; it must be > 0.0"),
        ({"name": "a", "optim": {"epochs": 0}}, "'optim.epochs': 0 is out of range"),
        ({"name": "a", "optim": {"epochs": 2.5}}, "expected an integer, got 2.5"),
        ({"name": "a", "optim": {"method": "rmsprop"}}, "accepted values: 'adam', 'sgd'"),
        ({"name": "a", "seed": True}, "expected an integer, got True"),
        ({"name": 5}, "expected a string"),
        ({"name": "a", "optim": {"lr": "fast"}}, "expected a number, got 'fast'"),
        ({"name": "a", "optim": {"lr": float("nan")}}, "NaN is not a valid value"),
        ({"name": "a", "optim": {"lr": float("inf")}}, "'optim.lr': inf (float) is not a valid value; use a finite number"),
        ({"name": "a", "optim": {"lr": "1e400"}}, "'optim.lr': '1e400' (str) is not a valid value; use a finite number"),
        ({"name": "a", "species": "H2"}, "expected a list"),
        ({"name": "a", "optim": 3}, "expected a section"),
    ],
)
def test_invalid_values_are_named(data, fragment):
    with pytest.raises(RecipeError) as info:
        build(Toy, data)
    assert fragment in str(info.value)


def test_overrides_set_nested_keys_and_parse_yaml():
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=0.5", "species=[A, B]", "name=x"])
    assert data == {"optim": {"lr": 0.5}, "species": ["A", "B"], "name": "x"}


@pytest.mark.parametrize("text", ["optim.lr", "=3", "optim..lr=1"])
def test_malformed_override(text):
    with pytest.raises(RecipeError, match="invalid override"):
        apply_overrides({}, [text])


def test_override_into_scalar_rejected():
    with pytest.raises(RecipeError, match="is a value, not a section"):
        apply_overrides({"name": "a"}, ["name.sub=1"])


def test_load_file_roundtrip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: demo\noptim:\n  lr: 1e-2\n")
    recipe = load_recipe(Toy, path, ["optim.epochs=3"])
    again = load_recipe(Toy, _write(tmp_path / "again.yaml", dump_yaml(recipe)))
    assert again == recipe


def test_malformed_yaml_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        read_yaml_mapping(_write(tmp_path / "bad.yaml", "name: [unclosed\n"))
    with pytest.raises(RecipeError, match="must contain a mapping"):
        read_yaml_mapping(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: a\nseed: 1\nseed: 2\n", "key 'seed' is given twice in one section (lines 2 and 3)"),
        ("name: a\noptim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' is given twice in one section (lines 3 and 4)"),
        ("name: a\nm:\n  1: 0.5\n  yes: 0.2\n", "keys '1' (line 3) and 'yes' (line 4) in one section are the same key"),
    ],
)
def test_duplicate_key_rejected(tmp_path, text, fragment):
    with pytest.raises(RecipeError) as info:
        read_yaml_mapping(_write(tmp_path / "twice.yaml", text))
    assert fragment in str(info.value)


def test_merge_key_may_be_overridden(tmp_path):
    text = "base: &b\n  lr: 0.1\n  epochs: 2\noptim:\n  <<: *b\n  lr: 0.5\n"
    data = read_yaml_mapping(_write(tmp_path / "merge.yaml", text))
    assert data["optim"] == {"lr": 0.5, "epochs": 2}


def test_missing_recipe_file_and_unknown_name(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(Toy, tmp_path / "absent.yaml")
    with pytest.raises(RecipeError, match="neither a file nor a bundled recipe"):
        load_recipe(Toy, "no-such-recipe", tool="discover-reactions")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
