"""Tokenizer built from GGUF-style metadata: byte-level BPE, special tokens, BOS, chat template."""

from __future__ import annotations

import pytest

from mmtk.core.errors import InputError
from mmtk.nn.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def metadata(add_bos: bool = False, pre: str = "smollm") -> dict:
    """GGUF tokenizer metadata: two control tokens, the 256 byte symbols and a few merges."""
    alphabet = sorted(set(bytes_to_unicode().values()))
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
    merged = ["he", "ll", "hell", "hello", "Ġw", "Ġwo"]
    tokens = ["<|im_start|>", "<|im_end|>"] + alphabet + merged
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": TEMPLATE,
    }


def test_merges_and_special_tokens():
    tokenizer = Tokenizer.from_gguf_metadata(metadata())
    ids = tokenizer.encode("hello world<|im_end|>")
    pieces = [tokenizer.token_text(i) for i in ids]
    assert pieces == ["hello", "Ġwo", "r", "l", "d", "<|im_end|>"]
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "hello world<|im_end|>"


def test_smollm_splits_digits_one_by_one():
    smollm = Tokenizer.from_gguf_metadata(metadata(pre="smollm"))
    plain = Tokenizer.from_gguf_metadata(metadata(pre="gpt2"))
    text = "x 2026 é"
    assert [smollm.token_text(i) for i in smollm.encode(text)] == ["x", "Ġ", "2", "0", "2", "6", "Ġ", "Ã", "©"]
    assert smollm.decode(smollm.encode(text)) == text
    assert plain.decode(plain.encode(text)) == text


def test_bos_added_once_after_round_trip(tmp_path):
    tokenizer = Tokenizer.from_gguf_metadata(metadata(add_bos=True))
    ids = tokenizer.encode("hello")
    assert ids[0] == 0
    assert ids[1:] == tokenizer.encode("hello", add_special_tokens=False)
    tokenizer.save(tmp_path)
    reloaded = Tokenizer.from_directory(tmp_path)
    assert reloaded.encode("hello") == ids
    assert reloaded.bos_token_id == 0
    assert reloaded.eos_token_id == 1


def test_chat_template_renders_messages(tmp_path):
    tokenizer = Tokenizer.from_gguf_metadata(metadata())
    messages = [{"role": "user", "content": "hi"}]
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(messages) == expected
    tokenizer.save(tmp_path)
    assert Tokenizer.from_directory(tmp_path).apply_chat_template(messages) == expected


def test_other_tokenizer_models_rejected():
    values = metadata()
    values["tokenizer.ggml.model"] = "llama"
    with pytest.raises(InputError, match="'llama' is not supported"):
        Tokenizer.from_gguf_metadata(values, "model.gguf")


def test_missing_chat_template_rejected():
    values = metadata()
    del values["tokenizer.chat_template"]
    with pytest.raises(InputError, match="no chat template"):
        Tokenizer.from_gguf_metadata(values).apply_chat_template([{"role": "user", "content": "hi"}])
