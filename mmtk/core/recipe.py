"""YAML recipes validated into typed dataclasses, with dotted overrides.

A tool describes its recipe as a tree of dataclasses. Each field carries a
type hint and, through :func:`param`, optional bounds, choices and a help
line. :func:`load_recipe` reads a YAML file (or a bundled recipe by name),
applies ``key.path=value`` overrides and builds the dataclass tree, raising
:class:`RecipeError` that names the key path, the bad value and what is
accepted.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Path``,
``Literal[...]``, ``Optional[T]``, ``list[T]``, ``tuple[T, ...]``,
``dict[str, T]`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mmtk.core.errors import RecipeError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    help: str = "",
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
) -> Any:
    """Declare a recipe field with a help line and optional numeric bounds.

    ``min``/``max`` are inclusive unless ``min_exclusive`` is set. A field
    with neither ``default`` nor ``default_factory`` is required.
    """
    metadata = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------- loading


def bundled_recipes_root() -> Path:
    """Return the folder of recipes shipped with mmtk (one subfolder per tool)."""
    source_tree = Path(__file__).resolve().parents[2] / "recipes"
    if source_tree.is_dir():
        return source_tree
    return Path(str(importlib.resources.files("mmtk_recipes")))


def list_bundled_recipes() -> dict[str, list[str]]:
    """Map each tool name to the names of its bundled recipes."""
    root = bundled_recipes_root()
    listing: dict[str, list[str]] = {}
    for tool_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        names = sorted(p.stem for p in tool_dir.glob("*.yaml"))
        if names:
            listing[tool_dir.name] = names
    return listing


def resolve_recipe_path(ref: str | Path, tool: str | None = None) -> Path:
    """Find a recipe given as a file path, ``tool/name`` or a bare name of ``tool``."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}. Give a YAML file path or a bundled recipe name (list them with 'mmtk recipes').")
        return path

    root = bundled_recipes_root()
    candidates = [root / f"{ref}.yaml"]
    if tool is not None:
        candidates.insert(0, root / tool / f"{ref}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate

    known = list_bundled_recipes().get(tool or "", [])
    hint = f" Bundled recipes for {tool}: {', '.join(known)}." if known else ""
    raise RecipeError(f"recipe not found: '{ref}' is neither a file nor a bundled recipe.{hint} List all with 'mmtk recipes'.")


class _DuplicateKeyError(Exception):
    """A mapping in a YAML file names the same key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, except that a key given twice in one mapping is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        first_seen: dict[Any, tuple[str, int]] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys ('<<') may be overridden by explicit keys
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_seen:
                text, first_line = first_seen[key]
                if text == key_node.value:
                    raise _DuplicateKeyError(f"key '{text}' is given twice in one section (lines {first_line} and {line}); keep one of them.")
                # YAML reads keys such as yes/1 or 1/1.0 as the same value.
                raise _DuplicateKeyError(
                    f"keys '{text}' (line {first_line}) and '{key_node.value}' (line {line}) in one section are the same key once YAML reads them; "
                    "quote them, for example \"yes\":, to keep them apart."
                )
            first_seen[key] = (key_node.value, line)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must contain a mapping, with the safe loader; a key given twice in one section is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a subclass of the safe loader
    except _DuplicateKeyError as exc:
        raise RecipeError(f"recipe {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must contain a mapping of keys to values, got {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into the key path and the YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"invalid override '{text}': write overrides as dotted.key=value, for example train.lr=3e-4.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"invalid override '{text}': the value is not valid YAML ({exc}).") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` set."""
    result = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
                node[key] = child
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise RecipeError(f"invalid override '{text}': recipe key '{where}' is a value, not a section.")
            node = child
        node[keys[-1]] = value
    return result


def load_recipe(cls: type[T], ref: str | Path, overrides: list[str] | None = None, tool: str | None = None) -> T:
    """Load a recipe file or bundled recipe into the dataclass ``cls``."""
    path = resolve_recipe_path(ref, tool)
    data = read_yaml_mapping(path)
    data = apply_overrides(data, list(overrides or []))
    return build(cls, data)


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Validate a plain mapping into the dataclass ``cls``."""
    return _convert(cls, data, path, None)


def to_dict(obj: Any) -> Any:
    """Convert a dataclass tree to plain YAML-safe Python values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _RecipeDumper(yaml.SafeDumper):
    """Block-style mappings, with lists of scalars kept on one line."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


def dump_yaml(obj: Any) -> str:
    """Render a dataclass tree (or plain data) as YAML in field order."""
    return yaml.dump(to_dict(obj), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# ------------------------------------------------------------- validation


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _key(path: str) -> str:
    return f"recipe key '{path}'" if path else "recipe"


def _convert(tp: Any, value: Any, path: str, field: dataclasses.Field | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None:
            if len(options) < len(args):
                return None
            raise RecipeError(f"{_key(path)} must be set, got null.")
        if len(options) == 1:
            return _convert(options[0], value, path, field)
        errors = []
        for option in options:
            try:
                return _convert(option, value, path, field)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(f"{_key(path)}: {_describe(value)} matches none of the accepted types ({'; '.join(errors)}).")

    if origin is Literal:
        if value not in args:
            accepted = ", ".join(repr(a) for a in args)
            raise RecipeError(f"{_key(path)}: invalid value {value!r}; accepted values: {accepted}.")
        return value

    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)

    if origin in (list, tuple):
        if not isinstance(value, list):
            raise RecipeError(f"{_key(path)}: expected a list, got {_describe(value)}.")
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{path}[{i}]", None) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items

    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{_key(path)}: expected a mapping, got {_describe(value)}.")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _convert(value_type, v, f"{path}.{k}", None) for k, v in value.items()}

    if tp is Any:
        return value

    return _check_bounds(_convert_scalar(tp, value, path), path, field)


def _convert_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{_key(path)}: expected true or false, got {_describe(value)}.")

    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"{_key(path)}: expected an integer, got {_describe(value)}.")
        if isinstance(value, int):
            return value
        number = _as_float(value)
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
        raise RecipeError(f"{_key(path)}: expected an integer, got {_describe(value)}.")

    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{_key(path)}: expected a number, got {_describe(value)}.")
        number = _as_float(value)
        if number is None:
            raise RecipeError(f"{_key(path)}: expected a number, got {_describe(value)}.")
        if math.isnan(number):
            raise RecipeError(f"{_key(path)}: NaN is not a valid value.")
        if math.isinf(number):
            raise RecipeError(f"{_key(path)}: {_describe(value)} is not a valid value; use a finite number.")
        return number

    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{_key(path)}: expected a string, got {_describe(value)}. Quote the value in YAML.")

    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value).expanduser()
        raise RecipeError(f"{_key(path)}: expected a file or folder path, got {_describe(value)}.")

    raise TypeError(f"unsupported recipe field type {tp!r} at {path}")


def _as_float(value: Any) -> float | None:
    # PyYAML reads '1e-3' (no dot) as a string, so numbers may arrive as text.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_bounds(value: Any, path: str, field: dataclasses.Field | None) -> Any:
    if field is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    low, high = field.metadata.get("min"), field.metadata.get("max")
    exclusive = field.metadata.get("min_exclusive", False)
    if low is not None and (value <= low if exclusive else value < low):
        relation = ">" if exclusive else ">="
        raise RecipeError(f"{_key(path)}: {value!r} is out of range; it must be {relation} {low}" + (f" and <= {high}." if high is not None else "."))
    if high is not None and value > high:
        bound = f">= {low} and " if low is not None else ""
        raise RecipeError(f"{_key(path)}: {value!r} is out of range; it must be {bound}<= {high}.")
    return value


def _convert_dataclass(cls: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise RecipeError(f"{_key(path)}: expected a section (mapping) of {cls.__name__}, got {_describe(value)}.")

    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        name = str(unknown[0])
        full = f"{path}.{name}" if path else name
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"unknown recipe key '{full}'.{hint} Accepted keys{' under ' + repr(path) if path else ''}: {', '.join(fields)}.")

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            given = value[name]
            if dataclasses.is_dataclass(hints[name]) and field.default_factory is not _MISSING and isinstance(given, dict):
                # A partial section keeps the tool's own defaults for the keys it omits.
                given = _deep_merge(to_dict(field.default_factory()), given)
            kwargs[name] = _convert(hints[name], given, sub, field)
        elif field.default is _MISSING and field.default_factory is _MISSING:
            help_text = field.metadata.get("help", "")
            raise RecipeError(f"missing recipe key '{sub}'" + (f" ({help_text})." if help_text else ".") + " Add it to the recipe or pass it as an override.")

    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{_key(path)}: {exc}") from exc


def describe_fields(cls: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """List (key path, type, help) for every field of a recipe dataclass tree."""
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, key + "."))
        else:
            name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            rows.append((key, name, field.metadata.get("help", "")))
    return rows
