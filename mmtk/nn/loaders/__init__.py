"""Offline loading of pretrained decoder weights.

``load_pretrained`` accepts a Hugging Face-format folder (``config.json``,
safetensors shards, ``tokenizer.json``), a GGUF file, or nothing for the
bundled SmolLM2-135M-Instruct. Nothing is downloaded. Every problem with the
files raises ``mmtk.core.errors.InputError`` (exit code 2 on the command
line) with the file named.

Example::

    from mmtk.nn.loaders import load_pretrained

    loaded = load_pretrained()                      # bundled SmolLM2-135M-Instruct
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = torch.tensor([loaded.tokenizer.encode(prompt)])
    new_ids = loaded.model.generate(ids, max_new_tokens=32)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmtk.core.errors import InputError
from mmtk.nn.llm import DecoderLM
from mmtk.nn.loaders.bundled import mmtk_cache_dir, smollm2_directory, smollm2_gguf_path
from mmtk.nn.loaders.gguf_file import load_gguf
from mmtk.nn.loaders.hf import load_hf_directory
from mmtk.nn.tokenizer import Tokenizer

__all__ = ["PretrainedDecoder", "load_pretrained", "load_hf_directory", "load_gguf", "smollm2_gguf_path", "smollm2_directory", "mmtk_cache_dir", "BUNDLED_MODEL_NAME"]

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class PretrainedDecoder:
    """A loaded decoder with its tokenizer and where it came from.

    Attributes:
        model: the decoder in eval mode.
        tokenizer: its tokenizer, or None when the checkpoint has none.
        source: the folder or file the weights were read from.
        name: a short label for logs and summaries.
    """

    model: DecoderLM
    tokenizer: Tokenizer | None
    source: Path
    name: str

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-sequence ids from the model config and the tokenizer."""
        ids = list(self.model.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids


def load_pretrained(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PretrainedDecoder:
    """Load a decoder and its tokenizer from local files only.

    Args:
        path: a Hugging Face-format folder, a ``.gguf`` file, or None for the
            bundled SmolLM2-135M-Instruct (converted into the cache on first use).
        device: torch device for the parameters.
        dtype: parameter dtype (fp32 by default).

    Raises:
        InputError: the path does not exist, is of an unknown kind, or holds
            files that are missing, corrupt or unsupported.
    """
    if path is None:
        folder = smollm2_directory()
        model, tokenizer = load_hf_directory(folder, device, dtype)
        return PretrainedDecoder(model, tokenizer, folder, BUNDLED_MODEL_NAME)

    path = Path(path).expanduser()
    if path.is_dir():
        model, tokenizer = load_hf_directory(path, device, dtype)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        model, tokenizer = load_gguf(path, device, dtype)
    elif path.is_file():
        raise InputError(f"unsupported model file {path}: pass a Hugging Face model folder or a .gguf file.")
    else:
        raise InputError(f"model not found: {path}. Pass a Hugging Face model folder or a .gguf file.")
    return PretrainedDecoder(model, tokenizer, path, path.name)
