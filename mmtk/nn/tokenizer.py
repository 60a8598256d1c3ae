"""Text tokenizer for the decoder LM: a ``tokenizers`` wrapper with special ids and a chat template.

A ``Tokenizer`` loads from a Hugging Face-format folder (``tokenizer.json``
plus ``tokenizer_config.json``) or is built from the tokenizer metadata of a
GGUF file (byte-level BPE vocabulary and merges). Chat templates are Jinja
templates rendered in a sandbox, as Hugging Face tokenizers render them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Tokenizer as BackendTokenizer, decoders, models, pre_tokenizers, processors

from mmtk.core.errors import InputError
from mmtk.core.io import write_json, write_text

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
GGUF_TOKEN_CONTROL = 3
GGUF_TOKEN_USER_DEFINED = 4


@dataclass
class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids and chat template a decoder needs.

    Attributes:
        backend: the ``tokenizers`` object that encodes and decodes.
        bos_token_id, eos_token_id, pad_token_id: special ids, None when absent.
        add_bos_token: the model expects a BOS id first; the backend's
            post-processor adds it when encoding with special tokens.
        chat_template: Jinja template over ``messages``, or None.
    """

    backend: BackendTokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None

    # ---- encoding ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        """Return the vocabulary entry of ``token_id`` (None when out of range)."""
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Return the ids of ``text``; with ``add_special_tokens`` the backend's post-processor adds BOS/EOS ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Return the text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat template ----------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) through the chat template.

        Raises:
            InputError: the tokenizer has no chat template, or the template fails.
        """
        if not self.chat_template:
            raise InputError("this tokenizer has no chat template; pass the prompt as raw text instead.")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            template = environment.from_string(self.chat_template)
            return template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._special_text(self.bos_token_id),
                eos_token=self._special_text(self.eos_token_id),
            )
        except TemplateError as exc:
            raise InputError(f"the chat template failed to render: {exc}") from exc

    def _special_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.backend.id_to_token(token_id) or ""

    # ---- files ------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (atomically each)."""
        folder = Path(folder)
        write_text(folder / "tokenizer.json", self.backend.to_str())
        config = {
            "bos_token": self._special_text(self.bos_token_id) or None,
            "eos_token": self._special_text(self.eos_token_id) or None,
            "pad_token": self._special_text(self.pad_token_id) or None,
            "add_bos_token": self.add_bos_token,
            "chat_template": self.chat_template,
        }
        write_json(folder / "tokenizer_config.json", config)

    @classmethod
    def from_directory(cls, folder: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` and ``chat_template.jinja``.

        Raises:
            InputError: ``tokenizer.json`` is missing or unreadable.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"tokenizer file not found: {path}. A Hugging Face model folder needs tokenizer.json.")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise InputError(f"cannot read tokenizer {path}: {exc}") from exc

        config: dict[str, Any] = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot parse {config_path}: {exc}") from exc
        template = config.get("chat_template")
        template_path = folder / "chat_template.jinja"
        if template is None and template_path.is_file():
            template = template_path.read_text(encoding="utf-8")
        if isinstance(template, list):
            # Some tokenizers store several named templates; use the default one.
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos_token_id = token_id("bos_token")
        add_bos_token = bool(config.get("add_bos_token", False))
        if add_bos_token and bos_token_id is not None and backend.encode("", add_special_tokens=True).ids[:1] != [bos_token_id]:
            # Some folders set add_bos_token without a post-processor that adds it.
            prepend_bos(backend, bos_token_id)
        return cls(
            backend=backend,
            bos_token_id=bos_token_id,
            eos_token_id=token_id("eos_token"),
            pad_token_id=token_id("pad_token"),
            add_bos_token=add_bos_token,
            chat_template=template,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str | Path = "GGUF file") -> "Tokenizer":
        """Build a byte-level BPE tokenizer from GGUF ``tokenizer.ggml.*`` metadata.

        Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE). The
        ``smollm`` pre-tokenizer splits digits one by one before the GPT-2
        byte-level split, as SmolLM2's own tokenizer does; other pre-tokenizer
        types get the plain GPT-2 split.

        Raises:
            InputError: the metadata lacks the vocabulary or uses another tokenizer model.
        """
        model_type = metadata.get("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise InputError(f"{source}: tokenizer model {model_type!r} is not supported; only byte-level BPE ('gpt2') is.")
        tokens = metadata.get("tokenizer.ggml.tokens")
        merges = metadata.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise InputError(f"{source}: the tokenizer metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges.")

        vocab = {token: index for index, token in enumerate(tokens)}
        merge_pairs = [tuple(merge.split(" ", 1)) for merge in merges]
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))

        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if metadata.get("tokenizer.ggml.pre") == "smollm":
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            # NOTE: pre-tokenizer types other than smollm and gpt2 (llama3, qwen2, ...)
            # split text with their own regular expressions, which this builder does not reproduce.
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

        token_types = metadata.get("tokenizer.ggml.token_type") or []
        special = [AddedToken(tokens[i], special=True, normalized=False) for i, kind in enumerate(token_types) if kind == GGUF_TOKEN_CONTROL]
        user_defined = [AddedToken(tokens[i], special=False, normalized=False) for i, kind in enumerate(token_types) if kind == GGUF_TOKEN_USER_DEFINED]
        if special:
            backend.add_special_tokens(special)
        if user_defined:
            backend.add_tokens(user_defined)

        def optional_id(key: str) -> int | None:
            value = metadata.get(key)
            return int(value) if value is not None else None

        bos_token_id = optional_id("tokenizer.ggml.bos_token_id")
        add_bos_token = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        if add_bos_token and bos_token_id is not None:
            prepend_bos(backend, bos_token_id)
        return cls(
            backend=backend,
            bos_token_id=bos_token_id,
            eos_token_id=optional_id("tokenizer.ggml.eos_token_id"),
            pad_token_id=optional_id("tokenizer.ggml.padding_token_id"),
            add_bos_token=add_bos_token,
            chat_template=metadata.get("tokenizer.chat_template"),
        )


def prepend_bos(backend: BackendTokenizer, bos_token_id: int) -> None:
    """Make ``backend`` put the BOS token first when it encodes with special tokens."""
    bos = backend.id_to_token(bos_token_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_token_id)]
    )
