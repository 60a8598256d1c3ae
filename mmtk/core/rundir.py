"""Run directories: one folder per run holding everything the run writes.

Layout (files appear as the run reaches them)::

    recipe.yaml        the resolved recipe, after overrides
    meta.json          tool, mmtk version, git commit, command line, start time, host
    log.txt            the run's log lines
    metrics.jsonl      one JSON object per logged step
    checkpoints/       ckpt-<step>.pt, written atomically
    summary.json       the final summary (the same object ``--json`` prints)

Only rank 0 of a distributed run writes; other ranks get a RunDir whose
writes are no-ops.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmtk.core import io
from mmtk.core.errors import InputError
from mmtk.core.logging import add_file_log, get_logger, remove_handler
import yaml

from mmtk.core.recipe import dump_yaml, to_dict

log = get_logger(__name__)


def is_main_process() -> bool:
    """Return True on rank 0 (or when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def default_run_path(tool: str) -> Path:
    """Return ``runs/<tool>/<UTC timestamp>-<random suffix>`` under the working directory.

    The suffix keeps runs started in the same second (array jobs, parallel
    shells) in separate folders.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("runs") / tool / f"{stamp}-{secrets.token_hex(3)}"


# Keys that may change when a run is resumed: its length, logging and device.
# Any other difference would make the stored results describe another run.
RESUMABLE_KEYS = frozenset({
    "device", "steps", "epochs", "max_steps", "max_epochs", "log_every", "eval_every",
    "checkpoint_every", "keep_checkpoints", "progress", "num_workers",
})


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """List the dotted key paths whose values differ between two recipe mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        changed: list[str] = []
        for key in keys:
            changed.extend(changed_keys(old.get(key), new.get(key), f"{prefix}{key}."))
        return changed
    return [] if old == new else [prefix.rstrip(".")]


def git_commit() -> str | None:
    """Return the commit of the mmtk source tree, or None outside a git checkout."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    if result.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5, check=False)
    return commit + ("-dirty" if dirty.stdout.strip() else "")


class RunDir:
    """The output folder of one run.

    Creating the object only checks the folder; nothing is written until
    :meth:`start`, so a tool validates all its input first and a rejected
    run leaves no trace. An existing run folder is only reused with
    ``resume=True``, and only with a recipe that differs from the stored one
    in :data:`RESUMABLE_KEYS` or the extra ``resumable_keys`` (last key
    components). ``can_resume=False`` marks a tool without ``--resume``, so
    its error for a used folder does not suggest that option.
    """

    def __init__(self, path: str | Path, tool: str, resume: bool = False, writer: bool | None = None, resumable_keys: frozenset[str] = frozenset(), can_resume: bool = True) -> None:
        self.path = Path(path)
        self.tool = tool
        self.resume = resume
        self.can_resume = can_resume
        self.resumable_keys = RESUMABLE_KEYS | resumable_keys
        self.writer = is_main_process() if writer is None else writer
        self._log_handler = None
        self._check_reusable()

    def _check_reusable(self) -> None:
        if not self.writer:
            return  # rank 0 checks; other ranks would see the folder it has just created
        for parent in [self.path, *self.path.parents]:
            if parent.exists() and not parent.is_dir():
                raise InputError(f"--out {self.path}: {parent} is a file, not a folder. Choose a folder path.")
        if not self.path.is_dir() or not any(self.path.iterdir()):
            if self.resume:
                raise InputError(f"cannot resume: {self.path} contains no run. Drop --resume to start a new run there.")
            return

        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise InputError(f"--out {self.path} is not empty and is not an mmtk run folder. Choose a new or empty folder so that nothing in it is overwritten.")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{meta_path} is unreadable ({exc}); choose a new --out folder.") from exc

        if meta.get("tool") != self.tool:
            raise InputError(f"--out {self.path} contains a run of {meta.get('tool')!r}, not {self.tool!r}. Choose another folder.")
        if not self.resume:
            if not self.can_resume:
                raise InputError(f"--out {self.path} already contains a {self.tool} run; choose a new --out folder so that its results are kept.")
            raise InputError(f"--out {self.path} already contains a {self.tool} run. Pass --resume to continue it, or choose a new --out folder so that its results are kept.")

    # -------------------------------------------------------------- writing

    def start(self, recipe: Any) -> None:
        """Create the folder and write the resolved recipe and run metadata."""
        if not self.writer:
            return

        recipe_path = self.path / "recipe.yaml"
        new_text = dump_yaml(recipe)
        if self.resume and recipe_path.is_file():
            self._check_resumed_recipe(recipe_path, new_text)

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the run folder {self.path}: {exc}. Choose another --out.") from exc
        io.write_text(recipe_path, new_text)

        from mmtk import __version__

        meta = {
            "tool": self.tool,
            "mmtk_version": __version__,
            "git_commit": git_commit(),
            "command": sys.argv,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resumed": self.resume,
            "host": platform.node(),
            "python": platform.python_version(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        io.write_json(self.path / "meta.json", meta)
        self._log_handler = add_file_log(self.path / "log.txt")
        log.info("run %s started in %s", self.tool, self.path)

    def _check_resumed_recipe(self, recipe_path: Path, new_text: str) -> None:
        stored_text = recipe_path.read_text(encoding="utf-8")
        if stored_text == new_text:
            return
        changed = changed_keys(yaml.safe_load(stored_text), yaml.safe_load(new_text))
        fixed = [key for key in changed if key.rsplit(".", 1)[-1] not in self.resumable_keys]
        if fixed:
            raise InputError(
                f"cannot resume {self.path}: the recipe differs from the stored one in {', '.join(fixed)}. "
                f"Resume with the stored recipe ({recipe_path}) and the same overrides, or start a new run in another --out folder."
            )
        log.info("resuming %s with changed %s", self.path, ", ".join(changed))
        io.write_text(self.path / "recipe.previous.yaml", stored_text)

    def file(self, name: str) -> Path:
        """Return the path of a file inside the run folder."""
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        """Folder for ``ckpt-<step>.pt`` files."""
        return self.path / "checkpoints"

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON object (for example ``{"step": 10, "loss": 0.3}``) to metrics.jsonl."""
        if not self.writer:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(io.to_json(record) + "\n")

    def truncate_metrics(self, after_step: int, key: str = "step") -> None:
        """Drop metric records logged after ``after_step`` (used when resuming)."""
        path = self.path / "metrics.jsonl"
        if not self.writer or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get(key, -1) <= after_step:
                kept.append(line)
        io.write_text(path, "".join(line + "\n" for line in kept))

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json and detach the run's log file."""
        if self.writer:
            io.write_json(self.path / "summary.json", summary)
            log.info("run %s finished; results in %s", self.tool, self.path)
        self.close()

    def close(self) -> None:
        """Detach the run's log file handler."""
        if self._log_handler is not None:
            remove_handler(self._log_handler)
            self._log_handler = None


def recipe_as_dict(recipe: Any) -> dict[str, Any]:
    """Return a recipe dataclass as a plain mapping (for summaries)."""
    return to_dict(recipe)
