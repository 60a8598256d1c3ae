"""Response matrices and Q-matrices: reading, validation and the FrcSub download.

Accepted layouts for both matrices:

- text (``.txt``, ``.dat`` or no suffix): whitespace-separated numbers, no
  header, one row per line, as in the FrcSub files;
- CSV (``.csv``): comma-separated, with an optional header row whose first
  cell is not a number (it then names the columns);
- HDF5 (``.h5``, ``.hdf5``): a dataset ``responses`` (students x items) or
  ``q_matrix`` (items x skills), optionally ``skill_names`` (strings).

Missing responses are written as an empty cell, ``NA``, ``NaN`` or ``.`` in
text and CSV, and as NaN in HDF5. A folder given as the response path is read
in the FrcSub layout: ``data.txt``, ``q.txt`` and, when present,
``skills.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mmtk.core.errors import DataError, InputError, MmtkError
from mmtk.core.io import atomic_path
from mmtk.core.logging import get_logger

log = get_logger(__name__)

MISSING_TOKENS = {"", "na", "nan", "."}

# DINA enumerates all 2^K skill profiles, so K is bounded.
MAX_SKILLS = 14

# URL schemes that urllib opens without extra handlers.
URL_SCHEMES = ("http", "https", "ftp", "file")

# Columns of a skills CSV.
SKILL_TABLE_COLUMNS = ("name", "skill", "description")

# FrcSub as published in the MIT-licensed GitHub repository TerryPei/AGCDM at
# commit 790d93c7 (byte-for-byte the files of Tatsuoka's fraction-subtraction
# data with de la Torre's 8-skill Q-matrix). Checksums are of those files.
FRCSUB_BASE_URL = "https://raw.githubusercontent.com/TerryPei/AGCDM/790d93c77aa8d9a0ae9f2b5229a88fc299c9c7ad/dataset/FrcSub/"
FRCSUB_SHA256 = {
    "data.txt": "ba9386aa309fac6bf517f2a6763052b6283f358d615c1a47f214ca87d6cda5f4",
    "q.txt": "d49b4ed82a4e73913897ff9828e46f0b376910c4d1a825f8e1d1345799e778ab",
}
FRCSUB_SKILLS = [
    ("K1", "Rewrite a whole number as a fraction"),
    ("K2", "Split a mixed number into its whole part and its fraction part"),
    ("K3", "Simplify a fraction before subtracting"),
    ("K4", "Bring both fractions to a common denominator"),
    ("K5", "Borrow one from the whole-number part"),
    ("K6", "Borrow across columns so the first numerator can take away the second"),
    ("K7", "Subtract the numerators"),
    ("K8", "Reduce the answer to lowest terms"),
]


@dataclass
class ResponseData:
    """Validated input of the mastery model.

    ``responses`` is float (students x items) with values 0, 1 or NaN for a
    missing response; ``q_matrix`` is int (items x skills) of 0/1.
    """

    responses: np.ndarray
    q_matrix: np.ndarray
    skill_names: list[str]
    skill_descriptions: list[str]
    source: str

    @property
    def n_students(self) -> int:
        return int(self.responses.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.responses.shape[1])

    @property
    def n_skills(self) -> int:
        return int(self.q_matrix.shape[1])


# ------------------------------------------------------------------ reading


def _parse_cell(text: str, path: Path, row: int, column: int) -> float:
    token = text.strip()
    if token.lower() in MISSING_TOKENS:
        return math.nan
    try:
        return float(token)
    except ValueError:
        raise DataError(f"{path}: value {token!r} in row {row + 1}, column {column + 1} is not a number. Use 0, 1 or NA for a missing response.") from None


def _rows_to_array(rows: list[list[str]], path: Path) -> np.ndarray:
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"{path} contains no rows of numbers.")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        first_bad = next(i for i, row in enumerate(rows) if len(row) != len(rows[0]))
        raise DataError(f"{path}: row {first_bad + 1} has {len(rows[first_bad])} values but row 1 has {len(rows[0])}. Every row must have the same number of values.")
    return np.array([[_parse_cell(cell, path, i, j) for j, cell in enumerate(row)] for i, row in enumerate(rows)], dtype=np.float64)


def _read_text(path: Path) -> np.ndarray:
    lines = path.read_text(encoding="utf-8").splitlines()
    return _rows_to_array([line.split() for line in lines], path)


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header = None
    if rows and rows[0] and _is_header(rows[0]):
        header = [cell.strip() for cell in rows[0]]
        rows = rows[1:]
    return _rows_to_array(rows, path), header


def _is_header(row: list[str]) -> bool:
    token = row[0].strip()
    if token.lower() in MISSING_TOKENS:
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def _read_hdf5(path: Path, dataset: str) -> tuple[np.ndarray, list[str] | None]:
    from mmtk.core.hdf5 import DatasetSpec, read_datasets

    specs = {dataset: DatasetSpec(shape=(None, None), kind="f"), "skill_names": DatasetSpec(shape=(None,), kind="S", required=False)}
    try:
        arrays, _ = read_datasets(path, specs)
    except DataError as exc:
        # read_datasets rejects NaN, but NaN marks a missing response here.
        if "NaN" not in str(exc):
            raise
        import h5py

        with h5py.File(path, "r") as handle:
            arrays = {dataset: np.asarray(handle[dataset][()], dtype=np.float64)}
            if "skill_names" in handle:
                arrays["skill_names"] = [v.decode() if isinstance(v, bytes) else str(v) for v in handle["skill_names"][()]]
    names = arrays.get("skill_names")
    return np.asarray(arrays[dataset], dtype=np.float64), (list(names) if names is not None else None)


def read_matrix(path: Path, dataset: str) -> tuple[np.ndarray, list[str] | None]:
    """Read a numeric matrix from text, CSV or HDF5; return (matrix, column names or None).

    ``dataset`` names the HDF5 dataset (``responses`` or ``q_matrix``).
    Missing cells become NaN.
    """
    if not path.is_file():
        raise DataError(f"{dataset.replace('_', '-')} file not found: {path}. Check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".h5", ".hdf5"):
            return _read_hdf5(path, dataset)
        if suffix == ".csv":
            return _read_csv(path)
        return _read_text(path), None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}.") from exc


def read_skill_table(path: Path) -> tuple[list[str] | None, list[str]]:
    """Read a skills CSV with a header; return (names or None, descriptions).

    The ``name`` column gives the skill ids; without it the ids are made
    from the ``skill`` column (``K<skill>``). ``description`` is optional.
    """
    if not path.is_file():
        raise DataError(f"skills file not found: {path}. Check the path or leave data.skills unset.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read skills file {path} as UTF-8 CSV ({exc}). Save it as a UTF-8 CSV with a header such as 'skill,description'.") from exc
    if not rows:
        raise DataError(f"skills file {path} has no rows; it needs a header such as 'skill,description' and one row per Q-matrix column.")
    if not any(c in SKILL_TABLE_COLUMNS for c in columns):
        raise DataError(f"skills file {path} has none of the accepted columns {', '.join(SKILL_TABLE_COLUMNS)} (header: {', '.join(map(repr, columns))}). Rename the header.")
    ignored = [c for c in columns if c not in SKILL_TABLE_COLUMNS]
    if ignored:
        log.info("skills file %s: ignoring column(s) %s", path, ", ".join(ignored))
    for index, row in enumerate(rows):
        if None in row or any(value is None for value in row.values()):
            raise DataError(f"skills file {path}: line {index + 2} does not have one cell per header column ({len(columns)}). Fix that line; quote descriptions that contain commas.")
    rows = [{key.strip(): value for key, value in row.items()} for row in rows]
    names = None
    if "name" in rows[0]:
        names = [row["name"].strip() for row in rows]
    elif "skill" in rows[0]:
        names = [f"K{row['skill'].strip()}" if row["skill"].strip().isdigit() else row["skill"].strip() for row in rows]
    descriptions = [(row.get("description") or "").strip() for row in rows]
    return names, descriptions


# --------------------------------------------------------------- validation


def _check_binary(matrix: np.ndarray, path: Path | str, what: str, allow_missing: bool) -> None:
    infinite = np.isinf(matrix)
    if infinite.any():
        row, column = np.argwhere(infinite)[0]
        raise DataError(f"{what} {path} contains {matrix[row, column]:g} in row {row + 1}, column {column + 1} ({int(infinite.sum())} infinite values in all). Use 0, 1{' or NA for a missing value' if allow_missing else ''}.")
    finite = np.isfinite(matrix)
    if not allow_missing and not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise DataError(f"{what} {path} has a missing or non-finite value in row {row + 1}, column {column + 1}; the {what} must be complete.")
    bad = finite & (matrix != 0) & (matrix != 1)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise DataError(f"{what} {path} must be binary (0 or 1{', or missing' if allow_missing else ''}), but row {row + 1}, column {column + 1} holds {matrix[row, column]:g} ({int(bad.sum())} non-binary values in all). Recode it to 0/1.")


def check_responses(responses: np.ndarray, path: Path | str) -> None:
    """Raise DataError unless ``responses`` contains only 0, 1 or NaN and every student answered an item."""
    _check_binary(responses, path, "response matrix", allow_missing=True)
    unanswered = np.flatnonzero(~np.isfinite(responses).any(axis=1))
    if unanswered.size:
        rows = ", ".join(str(int(i) + 1) for i in unanswered[:5])
        raise DataError(f"response matrix {path}: student row(s) {rows} answered no item ({unanswered.size} in all). Remove those rows.")


def validate(responses: np.ndarray, q_matrix: np.ndarray, responses_path: Path, q_path: Path) -> None:
    """Raise DataError unless the responses and Q-matrix fit the DINA model."""
    check_responses(responses, responses_path)
    _check_binary(q_matrix, q_path, "Q-matrix", allow_missing=False)

    if q_matrix.shape[0] != responses.shape[1]:
        raise DataError(f"Q-matrix {q_path} has {q_matrix.shape[0]} items (rows) but the response matrix {responses_path} has {responses.shape[1]} items (columns). Use the Q-matrix written for these responses.")
    if q_matrix.shape[1] > MAX_SKILLS:
        raise DataError(f"Q-matrix {q_path} has {q_matrix.shape[1]} skills; the DINA model enumerates 2^K skill profiles and accepts at most {MAX_SKILLS}.")

    unmeasured = np.flatnonzero(q_matrix.sum(axis=0) == 0)
    if unmeasured.size:
        columns = ", ".join(str(int(k) + 1) for k in unmeasured)
        raise DataError(f"Q-matrix {q_path}: skill column(s) {columns} are measured by no item, so their mastery cannot be estimated. Drop those columns or tag items with them.")
    skill_free = np.flatnonzero(q_matrix.sum(axis=1) == 0)
    if skill_free.size:
        rows = ", ".join(str(int(j) + 1) for j in skill_free)
        raise DataError(f"Q-matrix {q_path}: item row(s) {rows} need no skill. Tag each item with at least one skill or drop it from both files.")


def load_response_data(
    responses: Path,
    q_matrix: Path | None = None,
    skills: Path | None = None,
    skill_names: list[str] | None = None,
) -> ResponseData:
    """Read and validate responses, Q-matrix and skill names (see the module docstring).

    ``responses`` may be a folder in the FrcSub layout. ``skill_names``
    overrides the names from ``skills`` or the HDF5 file.
    """
    if not responses.exists():
        raise DataError(f"responses not found: {responses}. Check data.responses; it names a response file or a folder with data.txt and q.txt.")
    if responses.is_dir():
        folder = responses
        responses = folder / "data.txt"
        q_matrix = q_matrix or folder / "q.txt"
        if skills is None and (folder / "skills.csv").is_file():
            skills = folder / "skills.csv"
    if q_matrix is None:
        if responses.suffix.lower() not in (".h5", ".hdf5"):
            raise InputError(f"no Q-matrix given for {responses}. Set data.q_matrix to the items x skills file.")
        q_matrix = responses

    response_matrix, _ = read_matrix(responses, "responses")
    q_values, q_names = read_matrix(q_matrix, "q_matrix")
    validate(response_matrix, q_values, responses, q_matrix)
    n_skills = q_values.shape[1]

    names: list[str] | None = q_names
    descriptions = [""] * n_skills
    if skills is not None:
        table_names, descriptions = read_skill_table(skills)
        if len(descriptions) != n_skills:
            raise DataError(f"skills file {skills} has {len(descriptions)} rows but the Q-matrix {q_matrix} has {n_skills} skill columns. Give one row per column.")
        names = table_names or names
    if skill_names:
        names = list(skill_names)
    if names is None:
        names = [f"K{k + 1}" for k in range(n_skills)]
    _check_skill_names(names, n_skills, q_matrix)

    return ResponseData(
        responses=response_matrix,
        q_matrix=q_values.astype(np.int64),
        skill_names=names,
        skill_descriptions=descriptions,
        source=str(responses),
    )


def _check_skill_names(names: list[str], n_skills: int, q_path: Path) -> None:
    if len(names) != n_skills:
        raise DataError(f"{len(names)} skill names given but the Q-matrix {q_path} has {n_skills} skill columns. Give one name per column.")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise DataError(f"skill name {duplicate!r} appears twice; skill names must be unique.")
    if any(not n or n != n.strip() for n in names):
        raise DataError(f"skill names must be non-empty without surrounding spaces, got {names!r}.")


# ----------------------------------------------------------------- download


def _fetch_bytes(url: str, timeout_s: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - fixed https or user-given URL
        return response.read()


def check_base_url(base_url: str) -> None:
    """Raise InputError unless ``base_url`` is a non-empty URL with a scheme, such as https:// or file://."""
    if not base_url.strip():
        raise InputError("--url is empty. Pass the URL of the folder that contains data.txt and q.txt, or omit --url to use the AGCDM GitHub copy.")
    scheme = urllib.parse.urlsplit(base_url).scheme
    if not scheme:
        raise InputError(f"--url {base_url!r} is not a URL (no scheme). Pass an http://, https:// or file:// URL, for example {Path('/data/frcsub').as_uri()}/.")
    if scheme.lower() not in URL_SCHEMES:
        raise InputError(f"--url {base_url!r} has the unsupported scheme {scheme!r}. Pass an http://, https://, ftp:// or file:// URL.")


def download_frcsub(
    destination: Path,
    base_url: str = FRCSUB_BASE_URL,
    fetch: Callable[[str], bytes] = _fetch_bytes,
    force: bool = False,
) -> list[Path]:
    """Download FrcSub's ``data.txt`` and ``q.txt`` into ``destination`` and write ``skills.csv``.

    Each file is checked against its SHA-256 before it is renamed into place,
    so a mismatch leaves no file behind and raises DataError. An existing
    file whose content differs from the one to write (an edited
    ``skills.csv``, say) is kept and InputError raised, unless ``force``.
    Returns the written paths.
    """
    if destination.exists() and not destination.is_dir():
        raise InputError(f"download destination {destination} is a file, not a folder. Pass a folder path.")
    blocking = next((p for p in destination.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"download destination {destination} cannot be created because {blocking} is a file, not a folder. Pass a folder path.")
    check_base_url(base_url)
    if not base_url.endswith("/"):
        base_url += "/"

    payloads: dict[str, bytes] = {}
    for name, expected in FRCSUB_SHA256.items():
        url = base_url + name
        log.info("downloading %s", url)
        try:
            payload = fetch(url)
        except ValueError as exc:
            raise InputError(f"invalid download URL {url!r}: {exc}. Pass --url as an http://, https:// or file:// URL of the folder that contains data.txt and q.txt.") from exc
        except OSError as exc:
            if urllib.parse.urlsplit(url).scheme == "file":
                local = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
                raise DataError(f"cannot read {local} (from {url}): {exc}. Check that --url names the local folder that contains data.txt and q.txt.") from exc
            raise MmtkError(f"download of {url} failed: {exc}. Check the network connection or pass another --url.") from exc
        digest = hashlib.sha256(payload).hexdigest()
        if digest != expected:
            raise DataError(f"checksum mismatch for {url}: SHA-256 {digest}, expected {expected}. The file was not saved.")
        payloads[name] = payload

    table = "name,skill,description\n" + "".join(f'{name},{k + 1},"{text}"\n' for k, (name, text) in enumerate(FRCSUB_SKILLS))
    payloads["skills.csv"] = table.encode("utf-8")
    if not force:
        changed = [name for name, payload in payloads.items() if (destination / name).is_file() and (destination / name).read_bytes() != payload]
        if changed:
            raise InputError(f"{', '.join(str(destination / n) for n in changed)} already exist(s) with other content; nothing was written. Pass --force to overwrite.")

    # Every file passed its check before the folder or any file is written.
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for name, payload in payloads.items():
        with atomic_path(destination / name) as tmp:
            tmp.write_bytes(payload)
        written.append(destination / name)
    log.info("FrcSub saved in %s", destination)
    return written
