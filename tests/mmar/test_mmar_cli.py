"""End-to-end MMAR commands on real coco-mini photos: autoencoder, training, generation, captioning and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def make_word_tokenizer(folder: Path, captions: list[str]) -> Path:
    """Write a word-level tokenizer of the captions' words (keeps tests free of the SmolLM2 conversion)."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from mmtk.nn.tokenizer import Tokenizer

    backend = BackendTokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tokenizer = Tokenizer(backend=backend, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tokenizer.save(folder)
    return folder


def flat(output: str) -> str:
    """Join the words of wrapped console output with single spaces."""
    return " ".join(output.split())


TINY_AUTOENCODER = [
    "train.steps=2", "train.batch_size=4", "train.warmup_steps=0", "train.log_every=1", "train.progress=false",
    "data.samples_per_epoch=8", "data.skimage_photos=false", "data.resolution=32",
    "model.channels=8", "model.channel_mult=[1,2,2]", "model.norm_groups=4",
]


def tiny_mmar(autoencoder: Path, tokenizer: Path, steps: int = 4) -> list[str]:
    return [
        f"autoencoder.checkpoint={autoencoder}", "autoencoder.resolution=32", "autoencoder.patch_size=2",
        f"text.tokenizer={tokenizer}", "text.max_tokens=12",
        "backbone.hidden_size=32", "backbone.num_layers=2", "backbone.num_heads=2", "backbone.intermediate_size=64",
        "model.vit_width=32", "model.vit_depth=1", "model.vit_heads=2", "model.head_width=32", "model.head_depth=2",
        f"train.steps={steps}", "train.batch_size=4", "train.warmup_steps=0", "train.log_every=1", "train.checkpoint_every=2", "train.progress=false",
        f"stages=[{{until_step: 2, mask_min: 0.7, distribution: truncnorm}}, {{until_step: {steps}, mask_min: 0.0}}]",
        "sample.num_images=2", "sample.num_captions=2", "sample.iterations=2", "sample.steps=3", "sample.caption_tokens=4",
    ]


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """A tiny autoencoder and a tiny MMAR model trained on coco-mini."""
    from typer.testing import CliRunner

    from mmtk.mmar.data import read_coco_mini
    from mmtk_commands.main import app

    root = tmp_path_factory.mktemp("mmar")
    coco = shared_data / "coco-mini"
    captions = [c for r in read_coco_mini(coco) for c in r.captions]
    tokenizer = make_word_tokenizer(root / "tokenizer", captions)
    runner = CliRunner()

    result = runner.invoke(app, ["train-kl-autoencoder", "small", "--out", str(root / "ae"), f"data.images={coco}", *TINY_AUTOENCODER], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    autoencoder = root / "ae" / "autoencoder.pt"

    result = runner.invoke(app, ["train-mmar", "small", "--out", str(root / "mmar"), "--json", f"data.images={coco}", *tiny_mmar(autoencoder, tokenizer)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {"root": root, "coco": coco, "autoencoder": autoencoder, "tokenizer": tokenizer, "run": root / "mmar", "summary": summary}


def test_autoencoder_run_writes_scale_factor(trained):
    from mmtk.core.checkpoint import load_checkpoint

    state = load_checkpoint(trained["autoencoder"], expected_tool="train-kl-autoencoder")
    assert state["scale_factor"] > 0
    assert state["config"]["embed_dim"] == 4
    assert (trained["root"] / "ae" / "reconstructions.png").is_file()


def test_autoencoder_rejects_empty_channel_mult(shared_data, cli, tmp_path):
    out = tmp_path / "bad"
    result = cli("train-kl-autoencoder", "small", "--out", out, f"data.images={shared_data / 'coco-mini'}", *TINY_AUTOENCODER, "model.channel_mult=[]")
    assert result.exit_code == 2
    assert "'model.channel_mult': [] must list at least one positive multiplier" in flat(result.output)
    assert not out.exists()


def test_autoencoder_rejects_all_photos_held_out(shared_data, cli, tmp_path):
    out = tmp_path / "bad"
    result = cli("train-kl-autoencoder", "small", "--out", out, f"data.images={shared_data / 'coco-mini'}", *TINY_AUTOENCODER, "data.heldout_every=1")
    assert result.exit_code == 2
    assert "no training photos" in flat(result.output)
    assert not out.exists()


def test_train_mmar_writes_results(trained):
    run = trained["run"]
    summary = trained["summary"]
    assert summary["train"]["steps"] == 4
    assert summary["tokens_per_image"] == 16
    assert summary["token_dim"] == 16
    for name in ("model.pt", "latents.h5", "generated.png", "generated.h5", "captions.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    lines = (run / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert "caption" in json.loads(lines[0])


def test_latent_cache_matches_schema(trained):
    from mmtk.mmar.data import read_latent_cache

    cache = read_latent_cache(trained["run"] / "latents.h5")
    assert cache.moments.shape == (239, 8, 8, 8)
    assert len(cache.captions) == 239
    assert all(len(c) == 5 for c in cache.captions)
    assert cache.resolution == 32


def test_model_file_reloads_identically(trained):
    from mmtk.mmar.generate import GenerationSettings, generate_tokens
    from mmtk.mmar.sampling import load_mmar

    loaded = load_mmar(trained["run"] / "model.pt")
    settings = GenerationSettings(num_iterations=2, num_sampling_steps=3, cfg_scale=2.0)
    ids = [loaded.vocabulary.encode("A cat on a table.")]
    first = generate_tokens(loaded.model, ids, loaded.vocabulary.bos_id, loaded.vocabulary.eos_id, settings, torch.Generator().manual_seed(0))
    again = load_mmar(trained["run"] / "model.pt")
    second = generate_tokens(again.model, ids, again.vocabulary.bos_id, again.vocabulary.eos_id, settings, torch.Generator().manual_seed(0))
    assert first.shape == (1, 16, 16)
    assert torch.equal(first, second)


def test_generate_command_from_checkpoint(trained, cli, tmp_path):
    import h5py

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A dog on a beach.\n# a comment\n\nTwo pizzas on a plate.\n")
    out = tmp_path / "gen"
    result = cli("mmar-generate", "default", "--out", out, f"checkpoint={trained['run'] / 'model.pt'}", f"captions={prompts}", "steps=3", "iterations=2", "cfg=2.0")
    assert result.exit_code == 0, result.output
    with h5py.File(out / "generated.h5") as handle:
        images = handle["images"][()]
    assert images.shape == (2, 32, 32, 3)
    assert images.dtype == np.uint8
    assert (out / "generated.txt").read_text().splitlines() == ["0: A dog on a beach.", "1: Two pizzas on a plate."]


def test_generate_summary_lists_used_settings(trained, cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A dog on a beach.\n")
    out = tmp_path / "gen"
    result = cli("mmar-generate", "default", "--out", out, f"checkpoint={trained['run'] / 'model.pt'}", f"captions={prompts}", "steps=3", "iterations=2", "cfg=2.0")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"]["count"] == 1
    assert summary["settings"] == {"iterations": 2, "steps": 3, "cfg": 2.0, "cfg_schedule": "linear", "temperature": 1.0, "eta": 1.0}


def test_caption_command_from_checkpoint(trained, cli, tmp_path):
    photo = sorted((trained["coco"] / "images").glob("*.jpg"))[0]
    out = tmp_path / "cap"
    result = cli("mmar-caption", "default", "--out", out, f"checkpoint={trained['run'] / 'model.pt'}", f"images=[{photo}]", "max_tokens=4")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["image"] == str(photo)
    assert isinstance(rows[0]["caption"], str)


def test_caption_rejects_small_image(trained, cli, tmp_path):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((16, 20, 3), dtype=np.uint8)).save(small)
    out = tmp_path / "cap"
    result = cli("mmar-caption", "default", "--out", out, f"checkpoint={trained['run'] / 'model.pt'}", f"images=[{small}]")
    assert result.exit_code == 2
    assert "smaller than the model's 32x32 input" in flat(result.output)
    assert not out.exists()


def test_generate_rejects_empty_caption_file(trained, cli, tmp_path):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n# nothing here\n")
    out = tmp_path / "gen"
    result = cli("mmar-generate", "default", "--out", out, f"checkpoint={trained['run'] / 'model.pt'}", f"captions={prompts}")
    assert result.exit_code == 2
    assert "is empty" in flat(result.output)
    assert not out.exists()


def test_generate_rejects_other_tools_checkpoint(trained, cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A cat.\n")
    out = tmp_path / "gen"
    result = cli("mmar-generate", "default", "--out", out, f"checkpoint={trained['autoencoder']}", f"captions={prompts}")
    assert result.exit_code == 2
    assert "written by 'train-kl-autoencoder', not by 'train-mmar'" in flat(result.output)
    assert not out.exists()


def test_train_rejects_mmar_model_as_autoencoder(trained, cli, tmp_path):
    out = tmp_path / "bad"
    args = tiny_mmar(trained["run"] / "model.pt", trained["tokenizer"])
    result = cli("train-mmar", "small", "--out", out, f"data.images={trained['coco']}", *args)
    assert result.exit_code == 2
    assert "not by 'train-kl-autoencoder'" in flat(result.output)
    assert not out.exists()


def test_train_rejects_stages_short_of_steps(trained, cli, tmp_path):
    out = tmp_path / "bad"
    args = tiny_mmar(trained["autoencoder"], trained["tokenizer"]) + ["train.steps=10"]
    result = cli("train-mmar", "small", "--out", out, f"data.images={trained['coco']}", *args)
    assert result.exit_code == 2
    assert "extend the last stage" in flat(result.output)
    assert not out.exists()


def test_train_rejects_missing_captions_file(trained, cli, tmp_path):
    out = tmp_path / "bad"
    args = tiny_mmar(trained["autoencoder"], trained["tokenizer"])
    result = cli("train-mmar", "small", "--out", out, f"data.images={tmp_path}", *args)
    assert result.exit_code == 2
    assert "captions.jsonl" in flat(result.output)
    assert not out.exists()


def photo_folder(coco: Path, folder: Path, count: int = 6) -> tuple[Path, Path]:
    """Copy the first ``count`` coco-mini photos with their caption lines into ``folder``; returns (folder, path of the third photo)."""
    lines = (coco / "captions.jsonl").read_text().splitlines()[:count]
    (folder / "images").mkdir(parents=True)
    for line in lines:
        name = json.loads(line)["file"]
        (folder / name).write_bytes((coco / name).read_bytes())
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder, folder / json.loads(lines[2])["file"]


def test_train_rejects_truncated_photo(trained, cli, tmp_path):
    folder, photo = photo_folder(trained["coco"], tmp_path / "photos")
    photo.write_bytes(photo.read_bytes()[:2000])
    out = tmp_path / "bad"
    result = cli("train-mmar", "small", "--out", out, f"data.images={folder}", *tiny_mmar(trained["autoencoder"], trained["tokenizer"]))
    assert result.exit_code == 2
    assert f"cannot decode image file {photo}" in flat(result.output)
    assert not out.exists()


def test_train_rejects_photo_smaller_than_resolution(trained, cli, tmp_path):
    from PIL import Image

    folder, photo = photo_folder(trained["coco"], tmp_path / "photos")
    Image.fromarray(np.zeros((16, 20, 3), dtype=np.uint8)).save(photo, format="JPEG")
    out = tmp_path / "bad"
    result = cli("train-mmar", "small", "--out", out, f"data.images={folder}", *tiny_mmar(trained["autoencoder"], trained["tokenizer"]))
    assert result.exit_code == 2
    assert f"image {photo} is 20x16 px, smaller than the model's 32x32 input" in flat(result.output)
    assert not out.exists()


def test_train_rejects_foreign_latent_cache(trained, cli, tmp_path):
    # Same photo count as the cache, other image ids: the cached latents would pair with the wrong captions.
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "images").symlink_to(trained["coco"] / "images")
    rows = [json.loads(line) for line in (trained["coco"] / "captions.jsonl").read_text().splitlines()]
    (folder / "captions.jsonl").write_text("".join(json.dumps({**row, "image_id": row["image_id"] + 1}) + "\n" for row in rows))
    out = tmp_path / "bad"
    args = tiny_mmar(trained["autoencoder"], trained["tokenizer"]) + [f"data.latent_cache={trained['run'] / 'latents.h5'}"]
    result = cli("train-mmar", "small", "--out", out, f"data.images={folder}", *args)
    assert result.exit_code == 2
    assert "contains other photos than" in flat(result.output)
    assert not out.exists()


def test_train_rejects_cache_of_other_autoencoder(trained, cli, tmp_path):
    from typer.testing import CliRunner

    from mmtk_commands.main import app

    wide = tmp_path / "ae8"
    result = CliRunner().invoke(app, ["train-kl-autoencoder", "small", "--out", str(wide), f"data.images={trained['coco']}", *TINY_AUTOENCODER, "model.embed_dim=8"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "bad"
    args = tiny_mmar(wide / "autoencoder.pt", trained["tokenizer"]) + [f"data.latent_cache={trained['run'] / 'latents.h5'}"]
    result = cli("train-mmar", "small", "--out", out, f"data.images={trained['coco']}", *args)
    assert result.exit_code == 2
    assert "the cache comes from another autoencoder" in flat(result.output)
    assert not out.exists()


def test_train_rejects_iterations_above_tokens(trained, cli, tmp_path):
    out = tmp_path / "bad"
    args = tiny_mmar(trained["autoencoder"], trained["tokenizer"]) + [f"data.latent_cache={trained['run'] / 'latents.h5'}", "sample.iterations=17"]
    result = cli("train-mmar", "small", "--out", out, f"data.images={trained['coco']}", *args)
    assert result.exit_code == 2
    assert "17 exceeds the 16 image tokens" in flat(result.output)
    assert not out.exists()


def _generate_from_state(state: dict, cli, tmp_path: Path):
    """Save ``state`` as a model.pt, run mmar-generate on it; return (result, out folder)."""
    checkpoint = tmp_path / "model.pt"
    torch.save(state, checkpoint)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A cat.\n")
    out = tmp_path / "gen"
    return cli("mmar-generate", "default", "--out", out, f"checkpoint={checkpoint}", f"captions={prompts}", "steps=2", "iterations=2"), out


def test_generate_rejects_nan_weights(trained, cli, tmp_path):
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name][...] = float("nan")
    result, out = _generate_from_state(state, cli, tmp_path)
    assert result.exit_code == 2
    assert f"tensor 'model.{name}' contains NaN or infinite values" in flat(result.output)
    assert not out.exists()


@pytest.mark.parametrize("section", ["image", "vocabulary"])
def test_generate_rejects_model_without_section(trained, cli, tmp_path, section):
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    del state[section]
    result, out = _generate_from_state(state, cli, tmp_path)
    assert result.exit_code == 2
    assert f"lacks the entries {section} that mmtk train-mmar writes" in flat(result.output)
    assert "pass the model.pt of a finished run" in flat(result.output)
    assert not out.exists()


def test_generate_rejects_training_checkpoint(trained, cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A cat.\n")
    out = tmp_path / "gen"
    checkpoint = trained["run"] / "checkpoints" / "ckpt-000000002.pt"
    result = cli("mmar-generate", "default", "--out", out, f"checkpoint={checkpoint}", f"captions={prompts}")
    assert result.exit_code == 2
    assert "training checkpoint, not its final model.pt" in flat(result.output)
    assert not out.exists()


def _caption_from_state(state: dict, photo: Path, cli, tmp_path: Path):
    """Save ``state`` as a model.pt, run mmar-caption on ``photo`` with it; return (result, out folder)."""
    checkpoint = tmp_path / "model.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "cap"
    return cli("mmar-caption", "default", "--out", out, f"checkpoint={checkpoint}", f"images=[{photo}]", "max_tokens=4"), out


def _set(entry: str, value):
    """Return an edit of a model.pt state that sets ``entry`` (dotted for nested keys) to ``value``."""
    def edit(state: dict) -> None:
        *parents, key = entry.split(".")
        for parent in parents:
            state = state[parent]
        state[key] = value

    return edit


def _delete(entry: str):
    """Return an edit of a model.pt state that deletes ``entry`` (dotted for nested keys)."""
    def edit(state: dict) -> None:
        *parents, key = entry.split(".")
        for parent in parents:
            state = state[parent]
        del state[key]

    return edit


BROKEN_MODEL_FILES = [
    pytest.param(_set("image", "abc"), "entry 'image' must be a mapping with the keys patch_size, latent_shape, resolution, found str 'abc'", id="image-string"),
    pytest.param(_delete("image.patch_size"), "entry 'image' is missing the keys patch_size", id="image-without-patch-size"),
    pytest.param(_set("image.resolution", "x"), "entry 'image.resolution' must be a positive integer, found str 'x'", id="resolution-string"),
    pytest.param(_set("image.latent_shape", [4, 9, 9]), "image.latent_shape [4, 9, 9] does not match image.resolution 32 px", id="latent-shape-9"),
    pytest.param(_set("image.resolution", 64), "image.latent_shape [4, 8, 8] does not match image.resolution 64 px", id="resolution-64"),
    pytest.param(_set("image.latent_shape", [8, 8, 8]), "has 8 channels, but the stored autoencoder makes latents with 4", id="latent-channels"),
    pytest.param(_set("image.patch_size", 4), "gives 4 image tokens, but mmar_config.num_image_tokens is 16", id="patch-size-4"),
    pytest.param(_set("vocabulary", [1, 2]), "entry 'vocabulary' must be a mapping with the keys tokenizer, base_ids, max_tokens, found list [1, 2]", id="vocabulary-list"),
    pytest.param(_set("lora", "abc"), "entry 'lora' must be a mapping with the keys rank, alpha, targets, found str 'abc'", id="lora-string"),
    pytest.param(_set("mmar_config.image_attention", "sideways"), "entry 'mmar_config.image_attention' must be 'bidirectional' or 'causal'", id="attention-unknown"),
    pytest.param(_set("mmar_config", "x"), "entry 'mmar_config' must be a mapping with the keys token_dim, num_image_tokens, backbone, found str 'x'", id="config-string"),
    pytest.param(_delete("mmar_config"), "lacks the entries mmar_config that mmtk train-mmar writes", id="config-deleted"),
    pytest.param(_set("autoencoder", {}), "entry 'autoencoder' is missing the keys config, autoencoder, scale_factor", id="autoencoder-empty"),
    pytest.param(_set("autoencoder.autoencoder", {}), "entry 'autoencoder.autoencoder' does not match autoencoder.config:", id="autoencoder-weights-empty"),
    pytest.param(_set("sample", "abc"), "entry 'sample' must be a mapping of sampling settings", id="sample-string"),
    pytest.param(_set("sample.iterations", "x"), "entry 'sample.iterations' must be a positive integer", id="iterations-string"),
]


@pytest.mark.parametrize(("edit", "message"), BROKEN_MODEL_FILES)
def test_generate_rejects_broken_entry(trained, cli, tmp_path, edit, message):
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    edit(state)
    result, out = _generate_from_state(state, cli, tmp_path)
    assert result.exit_code == 2
    assert message in flat(result.output)
    assert "pass the model.pt of a finished run" in flat(result.output)
    assert not out.exists()


@pytest.mark.parametrize(("edit", "message"), BROKEN_MODEL_FILES)
def test_caption_rejects_broken_entry(trained, cli, tmp_path, edit, message):
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    edit(state)
    photo = sorted((trained["coco"] / "images").glob("*.jpg"))[0]
    result, out = _caption_from_state(state, photo, cli, tmp_path)
    assert result.exit_code == 2
    assert message in flat(result.output)
    assert "pass the model.pt of a finished run" in flat(result.output)
    assert not out.exists()


def test_generate_caps_missing_weight_list(trained, cli, tmp_path):
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    count = len(state["model"])
    state["model"] = {}
    result, out = _generate_from_state(state, cli, tmp_path)
    assert result.exit_code == 2
    assert f"entry 'model' does not match mmar_config and lora: {count} missing tensors (" in flat(result.output)
    assert len(flat(result.output)) < 500
    assert not out.exists()


def test_generate_rejects_short_vocabulary(trained, cli, tmp_path):
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    size = len(state["vocabulary"]["base_ids"])
    state["vocabulary"]["base_ids"] = state["vocabulary"]["base_ids"][:-1]
    result, out = _generate_from_state(state, cli, tmp_path)
    assert result.exit_code == 2
    assert f"lists {size - 1} token ids, but the decoder in mmar_config has {size}" in flat(result.output)
    assert not out.exists()


def test_resume_matches_uninterrupted_run(trained, cli, tmp_path):
    args = tiny_mmar(trained["autoencoder"], trained["tokenizer"]) + [f"data.images={trained['coco']}", f"data.latent_cache={trained['run'] / 'latents.h5'}", "sample.num_images=0", "sample.num_captions=0"]
    full = tmp_path / "full"
    assert cli("train-mmar", "small", "--out", full, *args).exit_code == 0

    # Simulate a run killed after its step-2 checkpoint: drop everything written later.
    part = tmp_path / "part"
    assert cli("train-mmar", "small", "--out", part, *args).exit_code == 0
    (part / "checkpoints" / "ckpt-000000004.pt").unlink()
    (part / "model.pt").unlink()
    result = cli("train-mmar", "small", "--out", part, "--resume", *args)
    assert result.exit_code == 0, result.output

    full_state = torch.load(full / "model.pt", weights_only=True)["model"]
    part_state = torch.load(part / "model.pt", weights_only=True)["model"]
    for name, tensor in full_state.items():
        assert torch.equal(tensor, part_state[name]), name


def test_two_process_ddp_run(trained, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    args = tiny_mmar(trained["autoencoder"], trained["tokenizer"]) + [f"data.images={trained['coco']}", f"data.latent_cache={trained['run'] / 'latents.h5'}", "train.batch_size=8", "sample.num_images=0", "sample.num_captions=0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mmtk_commands.main", "train-mmar", "small", "--out", str(out), "-q", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["world_size"] == 2
    assert summary["train"]["steps"] == 4
    assert (out / "model.pt").is_file()


def test_generate_rejects_missing_tokenizer(trained, cli, tmp_path):
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    state["vocabulary"]["tokenizer"] = str(tmp_path / "moved-tokenizer")
    result, out = _generate_from_state(state, cli, tmp_path)
    assert result.exit_code == 2
    assert "entry 'vocabulary.tokenizer' names the tokenizer" in flat(result.output)
    assert "restore it at that path" in flat(result.output)
    assert not out.exists()


def test_stored_tokenizer_path_is_absolute(tmp_path, monkeypatch):
    from mmtk.mmar.train import stored_tokenizer_source

    monkeypatch.chdir(tmp_path)
    assert stored_tokenizer_source("tok") == str(tmp_path.resolve() / "tok")
    assert stored_tokenizer_source("bundled") == "bundled"
    assert stored_tokenizer_source("shapes") == "shapes"


def test_generate_explains_relative_tokenizer_path(trained, cli, tmp_path):
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    state["vocabulary"]["tokenizer"] = "no-such-folder/tok"
    result, out = _generate_from_state(state, cli, tmp_path)
    assert result.exit_code == 2
    assert "relative to the folder train-mmar ran in" in flat(result.output)
    assert not out.exists()
