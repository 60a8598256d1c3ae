"""Weight loaders: GGUF files, bad checkpoints through generate-text, and the bundled SmolLM2."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from mmtk.core.errors import InputError
from mmtk.nn.loaders import load_gguf, load_hf_directory, load_pretrained

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TOLERANCE = 1e-4


def tiny_llama(folder, seed: int = 0, **extra):
    """Save a random tiny transformers Llama as safetensors and return it."""
    torch.manual_seed(seed)
    values = dict(vocab_size=53, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=1000.0)
    values.update(extra)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def permute_like_llama_cpp(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder q/k rows the way llama.cpp's converter does (half-split to interleaved pairs)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(path, model, architecture: str = "llama") -> None:
    """Write ``model``'s weights as an F32 GGUF file with llama.cpp names and metadata.

    Only the Llama converter of llama.cpp reorders q/k rows; Qwen2 files keep the Hugging Face order.
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, tensor in model.state_dict().items():
        values = tensor.numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", values)
        elif key == "model.norm.weight":
            writer.add_tensor("output_norm.weight", values)
        elif key == "lm_head.weight":
            if not config.tie_word_embeddings:
                writer.add_tensor("output.weight", values)
        else:
            _, _, block, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if architecture == "llama" and module == "self_attn.q_proj":
                values = permute_like_llama_cpp(values, config.num_attention_heads)
            elif architecture == "llama" and module == "self_attn.k_proj":
                values = permute_like_llama_cpp(values, config.num_key_value_heads)
            writer.add_tensor(f"blk.{block}.{names[module]}.{kind}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- GGUF ------------------------------------------------------------------------------


def test_gguf_logits_match_source_model(tmp_path):
    reference = tiny_llama(tmp_path / "hf")
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, reference)
    model, tokenizer = load_gguf(path)
    ids = torch.randint(0, 53, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        actual = model(ids).logits
    assert tokenizer is None
    assert not model.config.tie_word_embeddings
    assert (actual - expected).abs().max().item() < TOLERANCE


def test_qwen2_gguf_logits_match_source_model(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=53, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000.0)
    reference = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.3)
    path = tmp_path / "qwen2.gguf"
    write_llama_gguf(path, reference, architecture="qwen2")
    model, _ = load_gguf(path)
    ids = torch.randint(0, 53, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert model.config.attention_bias
    assert difference < TOLERANCE


def test_sharded_safetensors_folder_loads(tmp_path):
    reference = tiny_llama(tmp_path / "single")
    reference.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    model, _ = load_hf_directory(tmp_path / "sharded")
    ids = torch.randint(0, 53, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        difference = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert len(shards) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert difference < TOLERANCE


def test_gguf_without_output_ties_head(tmp_path):
    reference = tiny_llama(tmp_path / "hf", tie_word_embeddings=True)
    path = tmp_path / "tied.gguf"
    write_llama_gguf(path, reference)
    model, _ = load_gguf(path)
    ids = torch.randint(0, 53, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.embed_tokens.weight
    assert difference < TOLERANCE


def test_corrupt_gguf_rejected(tmp_path):
    reference = tiny_llama(tmp_path / "hf")
    good = tmp_path / "good.gguf"
    write_llama_gguf(good, reference)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:1000])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    for path in (truncated, garbage):
        with pytest.raises(InputError, match="cannot read GGUF file") as error:
            load_gguf(path)
        assert str(path) in str(error.value)


def test_unsupported_gguf_architecture_rejected(tmp_path):
    reference = tiny_llama(tmp_path / "hf")
    path = tmp_path / "phi.gguf"
    write_llama_gguf(path, reference, architecture="phi2")
    with pytest.raises(InputError, match="architecture 'phi2' is not supported"):
        load_gguf(path)


# ---- bad input through the command line -----------------------------------------------


@pytest.fixture()
def bad_checkpoints(tmp_path):
    """Case name -> (--model argument, file the message must name, text the message must contain)."""
    source = tmp_path / "source"
    tiny_llama(source)
    cases = {}

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(source / "config.json", no_weights / "config.json")
    cases["no-weights"] = (no_weights, no_weights, "no weights in")

    unsupported = tmp_path / "unsupported"
    shutil.copytree(source, unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    config["model_type"] = "gpt2"
    (unsupported / "config.json").write_text(json.dumps(config))
    cases["unsupported-config"] = (unsupported, unsupported / "config.json", "model_type 'gpt2' is not supported")

    mismatched = tmp_path / "mismatched"
    shutil.copytree(source, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] = 96
    (mismatched / "config.json").write_text(json.dumps(config))
    cases["mismatched-shapes"] = (mismatched, mismatched / "model.safetensors", "has shape (48, 80) but the configuration implies (48, 96)")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(source, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["corrupt-safetensors"] = (corrupt, corrupt / "model.safetensors", "cannot read safetensors file")

    garbage_gguf = tmp_path / "garbage.gguf"
    garbage_gguf.write_bytes(b"\x00" * 64)
    cases["corrupt-gguf"] = (garbage_gguf, garbage_gguf, "cannot read GGUF file")

    cases["missing"] = (tmp_path / "absent", tmp_path / "absent", "model not found")
    return cases


@pytest.mark.parametrize("case", ["no-weights", "unsupported-config", "mismatched-shapes", "corrupt-safetensors", "corrupt-gguf", "missing"])
def test_generate_text_rejects_bad_checkpoint(cli, bad_checkpoints, case, tmp_path, monkeypatch, caplog):
    model_arg, named_file, needle = bad_checkpoints[case]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    # The console handler shortens long paths to fit the terminal, so read the full record.
    mmtk_logger = logging.getLogger("mmtk")
    mmtk_logger.addHandler(caplog.handler)
    try:
        result = cli("generate-text", "--prompt", "hello", "--model", model_arg, "--json")
    finally:
        mmtk_logger.removeHandler(caplog.handler)

    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert result.exit_code == 2
    assert json.loads(result.stdout)["exit_code"] == 2
    assert len(errors) == 1
    assert needle in errors[0]
    assert str(named_file) in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_load_pretrained_rejects_other_files(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 8)
    with pytest.raises(InputError, match="unsupported model file"):
        load_pretrained(path)


def test_pickle_only_folder_rejected(tmp_path):
    folder = tmp_path / "pickle"
    tiny_llama(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle weights"):
        load_hf_directory(folder)
