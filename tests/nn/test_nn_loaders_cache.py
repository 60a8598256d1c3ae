"""Model cache of the bundled model: manifest checks, repair, stale staging folders, unwritable caches.

A tiny random GGUF file stands in for the packaged SmolLM2 file, so each
conversion takes well under a second.
"""

from __future__ import annotations

import json

import os
import stat
import time

import numpy as np
import pytest
import torch

from mmtk.core.errors import InputError
from mmtk.nn.llm import DecoderConfig, DecoderLM
from mmtk.nn.loaders import bundled, load_pretrained

gguf = pytest.importorskip("gguf")

GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path) -> DecoderLM:
    """Write a random 2-block Llama with a tied head as an F32 GGUF file (q/k rows in the Hugging Face order)."""
    config = DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, tensor in model.state_dict().items():
        values = tensor.numpy().astype(np.float32)
        if key == "embed_tokens.weight":
            writer.add_tensor("token_embd.weight", values)
        elif key == "norm.weight":
            writer.add_tensor("output_norm.weight", values)
        elif key.startswith("layers."):
            _, block, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            writer.add_tensor(f"blk.{block}.{GGUF_NAMES[module]}.{kind}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture()
def tiny_bundle(tmp_path, monkeypatch):
    """Point the bundled-model loader at a tiny GGUF file and MMTK_CACHE at an empty folder."""
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    cache = tmp_path / "cache"
    monkeypatch.setattr(bundled, "smollm2_gguf_path", lambda: gguf_path)
    monkeypatch.setenv("MMTK_CACHE", str(cache))
    return cache, bundled.smollm2_cache_path(gguf_path)


def logits_of(folder) -> torch.Tensor:
    model = load_pretrained(folder).model
    with torch.no_grad():
        return model(torch.arange(10)[None]).logits


def test_cache_files_world_readable(tiny_bundle):
    cache, target = tiny_bundle
    folder = bundled.smollm2_directory()

    assert folder == target
    assert sorted(p.name for p in cache.iterdir()) == [target.name]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_intact_cache_not_converted_again(tiny_bundle):
    folder = bundled.smollm2_directory()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    assert bundled.smollm2_directory() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def damage_truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])


def damage_overwrite(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4096:] = b"\x00" * 4096
    path.write_bytes(bytes(data))


def damage_delete_config(folder):
    (folder / "config.json").unlink()


def damage_delete_manifest(folder):
    (folder / "manifest.json").unlink()


@pytest.mark.parametrize("damage", [damage_truncate, damage_overwrite, damage_delete_config, damage_delete_manifest])
def test_damaged_cache_converted_again(tiny_bundle, damage, caplog):
    cache, _ = tiny_bundle
    folder = bundled.smollm2_directory()
    expected = logits_of(folder)
    damage(folder)
    time.sleep(0.01)  # the damage must change the mtime for the overwrite case

    with caplog.at_level("WARNING", logger="mmtk"):
        repaired = bundled.smollm2_directory()

    assert repaired == folder
    assert any("is damaged" in record.getMessage() for record in caplog.records)
    assert bundled.cache_problem(folder) is None
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]
    assert torch.equal(logits_of(folder), expected)


def test_stale_staging_folders_removed(tiny_bundle):
    cache, target = tiny_bundle
    cache.mkdir()
    old = cache / f".{target.name}.old"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"\x00" * 16)
    hour_ago = time.time() - 2 * bundled.STALE_STAGING_SECONDS
    os.utime(old, (hour_ago, hour_ago))
    dead_owner = cache / f".{target.name}.dead"
    dead_owner.mkdir()
    (dead_owner / bundled.OWNER_NAME).write_text(f"{bundled.socket.gethostname()} 999999999\n")
    live_owner = cache / f".{target.name}.live"
    live_owner.mkdir()
    (live_owner / bundled.OWNER_NAME).write_text(f"{bundled.socket.gethostname()} {os.getpid()}\n")

    bundled.smollm2_directory()

    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, live_owner.name])


@pytest.mark.parametrize("kind", ["file", "below-file"])
def test_unwritable_cache_rejected_before_conversion(tmp_path, monkeypatch, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MMTK_CACHE", str(blocker if kind == "file" else blocker / "cache"))
    monkeypatch.setattr(bundled, "smollm2_gguf_path", lambda: tmp_path / "unused.gguf")
    monkeypatch.setattr(bundled, "smollm2_cache_path", lambda path: bundled.mmtk_cache_dir() / "target")

    def fail_conversion(*args):
        raise AssertionError("the conversion started before the cache was checked")

    monkeypatch.setattr(bundled, "convert_gguf_to_hf_directory", fail_conversion)
    with pytest.raises(InputError, match="cannot write the model cache"):
        bundled.smollm2_directory()


def test_unwritable_cache_exits_2(cli, tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MMTK_CACHE", str(blocker / "cache"))
    result = cli("generate-text", "--prompt", "hi", "--json")

    assert result.exit_code == 2
    assert json.loads(result.stdout)["exit_code"] == 2
