"""``mmtk generate-text`` on a tiny random model with a tokenizer: output, help text and prompt checks."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from mmtk.core.io import write_json
from mmtk.nn.llm import DecoderConfig, DecoderLM
from mmtk.nn.loaders.bundled import hf_config_from
from mmtk.nn.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
CONTEXT_LENGTH = 64


def tokenizer_metadata() -> dict:
    """GGUF tokenizer metadata: two control tokens and the 256 byte symbols, without merges."""
    alphabet = sorted(set(bytes_to_unicode().values()))
    tokens = ["<|im_start|>", "<|im_end|>"] + alphabet
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": TEMPLATE,
    }


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A Hugging Face-format folder with a random 2-block decoder and a byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = Tokenizer.from_gguf_metadata(tokenizer_metadata())
    config = DecoderConfig(vocab_size=258, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=CONTEXT_LENGTH, bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = DecoderLM(config)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    write_json(folder / "config.json", hf_config_from(config))
    tokenizer.save(folder)
    return folder


def error_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.fixture()
def mmtk_log(caplog):
    """Capture mmtk's log records in full (the console handler shortens long lines)."""
    logger = logging.getLogger("mmtk")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_plain_output_is_not_wrapped(cli, tiny_model_folder, monkeypatch):
    monkeypatch.setenv("COLUMNS", "20")
    args = ("generate-text", "--prompt", "hello there", "--raw", "--model", tiny_model_folder, "--max-new-tokens", "40", "-q")

    summary = json.loads(cli(*args, "--json").stdout)
    result = cli(*args)

    assert result.exit_code == 0
    assert len(summary["text"]) > 20
    assert result.stdout == summary["text"] + "\n"


@pytest.mark.parametrize("raw", [True, False])
def test_empty_prompt_rejected(cli, tiny_model_folder, mmtk_log, raw):
    args = ["generate-text", "--prompt", "", "--model", tiny_model_folder, "--json"] + (["--raw"] if raw else [])
    result = cli(*args)

    assert result.exit_code == 2
    assert json.loads(result.stdout)["exit_code"] == 2
    assert "the prompt is empty" in error_messages(mmtk_log)[0]


def test_prompt_longer_than_context_rejected(cli, tiny_model_folder, mmtk_log):
    prompt = "x" * (CONTEXT_LENGTH - 10)  # one token per character, without merges
    result = cli("generate-text", "--prompt", prompt, "--raw", "--model", tiny_model_folder, "--max-new-tokens", "11", "--json")

    message = error_messages(mmtk_log)[0]
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error_type"] == "InputError"
    assert f"the prompt has {CONTEXT_LENGTH - 10} tokens" in message
    assert f"max_position_embeddings) of {CONTEXT_LENGTH}" in message


def test_prompt_filling_context_accepted(cli, tiny_model_folder):
    prompt = "x" * (CONTEXT_LENGTH - 10)
    result = cli("generate-text", "--prompt", prompt, "--raw", "--model", tiny_model_folder, "--max-new-tokens", "10", "--json", "-q")

    assert result.exit_code == 0
    assert json.loads(result.stdout)["prompt_tokens"] == CONTEXT_LENGTH - 10


def test_help_names_default_model(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = cli("generate-text", "--help").stdout

    assert "(default: the bundled SmolLM2-135M-Instruct)" in text
    assert "recipe" not in text


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_top_p_out_of_range_rejected(cli, value):
    result = cli("generate-text", "--prompt", "hi", "--top-p", value)

    assert result.exit_code == 2
    assert f"{float(value)} is not in the range 0<x<=1" in result.output
