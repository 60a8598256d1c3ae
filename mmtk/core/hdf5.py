"""HDF5 stores: atomic writes and schema-checked reads.

Every mmtk HDF5 file carries two root attributes, ``mmtk_schema`` (the
schema name, for example ``"mmtk.trajectories/1"``) and ``mmtk_version``.
Each tool documents its datasets (names, shapes, dtypes, units) beside the
schema name. :func:`read_datasets` turns a missing, truncated or foreign
file into a :class:`DataError` that names the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from mmtk.core.errors import DataError
from mmtk.core.io import atomic_path


@dataclass(frozen=True)
class DatasetSpec:
    """Expected shape and dtype kind of one dataset.

    ``shape`` entries are ints (fixed), ``None`` (any size) or a name such as
    ``"n_species"``; equal names must have equal sizes across the file.
    ``kind`` is a numpy dtype kind: ``"f"`` float, ``"i"`` int, ``"u"``
    unsigned, ``"b"`` bool, ``"S"``/``"O"`` strings.
    """

    shape: tuple[int | str | None, ...]
    kind: str = "f"
    required: bool = True


def write_datasets(
    target: str | Path,
    datasets: Mapping[str, Any],
    *,
    schema: str,
    attrs: Mapping[str, Any] | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Write arrays (keys may contain ``/`` for groups) and root attributes atomically.

    Strings and lists of strings are stored as UTF-8 variable-length strings.
    """
    from mmtk import __version__

    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["mmtk_schema"] = schema
            handle.attrs["mmtk_version"] = __version__
            for key, value in (attrs or {}).items():
                handle.attrs[key] = value
            for name, value in datasets.items():
                _write_one(handle, name, value, compression)
    return Path(target)


def _write_one(handle: h5py.File, name: str, value: Any, compression: str | None) -> None:
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)):
        handle.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
        return
    array = np.asarray(value)
    use_compression = compression if array.ndim > 0 and array.size > 64 else None
    handle.create_dataset(name, data=array, compression=use_compression)


def open_h5(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only, turning OS and format errors into DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}. Check the path.")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"cannot read {path} as HDF5 (truncated or not an HDF5 file): {exc}. Regenerate or re-download the file.") from exc


def read_datasets(
    path: str | Path,
    specs: Mapping[str, DatasetSpec],
    *,
    schema: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and validate the datasets in ``specs``; return (arrays, root attributes).

    Strings come back as Python ``str`` (scalars) or lists of ``str``.
    """
    path = Path(path)
    with open_h5(path) as handle:
        attrs = {k: _decode(v) for k, v in handle.attrs.items()}
        if schema is not None and attrs.get("mmtk_schema") not in (None, schema):
            raise DataError(f"{path} has schema {attrs.get('mmtk_schema')!r}, expected {schema!r}. Use a file written for this tool.")

        arrays: dict[str, Any] = {}
        sizes: dict[str, tuple[int, str]] = {}
        for name, spec in specs.items():
            if name not in handle:
                if spec.required:
                    raise DataError(f"{path} has no dataset '{name}' (expected shape {_shape_text(spec.shape)}). Datasets present: {', '.join(_list_names(handle)) or 'none'}.")
                continue
            try:
                raw = handle[name][()]
            except (OSError, KeyError, ValueError) as exc:
                raise DataError(f"cannot read dataset '{name}' from {path} (file truncated or corrupt): {exc}.") from exc
            arrays[name] = _check(path, name, raw, spec, sizes)
    return arrays, attrs


def _list_names(handle: h5py.File) -> list[str]:
    names: list[str] = []
    handle.visit(lambda n: names.append(n) if isinstance(handle[n], h5py.Dataset) else None)
    return names


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _shape_text(shape: tuple[int | str | None, ...]) -> str:
    return "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"


def _check(path: Path, name: str, raw: Any, spec: DatasetSpec, sizes: dict[str, tuple[int, str]]) -> Any:
    if spec.kind in "SO":
        return _decode(raw)

    array = np.asarray(raw)
    kinds = {"f": "fiu", "i": "iu", "u": "u", "b": "b"}.get(spec.kind, spec.kind)
    if array.dtype.kind not in kinds:
        raise DataError(f"dataset '{name}' in {path} has dtype {array.dtype}, expected kind '{spec.kind}'.")
    if array.ndim != len(spec.shape):
        raise DataError(f"dataset '{name}' in {path} has shape {array.shape}, expected {_shape_text(spec.shape)}.")

    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(want, int) and want != got:
            raise DataError(f"dataset '{name}' in {path} has shape {array.shape}, expected size {want} on axis {axis}.")
        if isinstance(want, str):
            if want in sizes and sizes[want][0] != got:
                other_size, other_name = sizes[want]
                raise DataError(f"dataset '{name}' in {path} has {got} entries on axis {axis} but '{other_name}' has {other_size} ({want} must agree).")
            sizes.setdefault(want, (got, name))

    if spec.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"dataset '{name}' in {path} has {bad} NaN or infinite values. Remove or fill them before running.")
    return array
