"""Bad input to ctp-pretrain and ctp-evaluate: each case must exit 2 (or raise DataError) and write nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmtk.core.errors import DataError
from mmtk.ctp.video import encode_video, probe_video, read_hmdb51_split, read_ucf101_classes, read_ucf101_split

from .conftest import FRAMES, moving_texture
from .test_ctp_cli import TINY_EVALUATE, TINY_PRETRAIN, write_recipe


def write_truncated_video(path: Path, keep_fraction: float) -> Path:
    """Write a synthetic mp4 with its header (moov) first, then cut it to ``keep_fraction`` of its bytes.

    The header still states all FRAMES frames, but only the frames before the cut decode.
    """
    import av

    plain = path.with_name("plain.mp4")
    encode_video(plain, moving_texture(7))
    whole = path.with_name("faststart.mp4")
    with av.open(str(plain)) as source, av.open(str(whole), "w", options={"movflags": "faststart"}) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            target.mux(packet)
    data = whole.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    plain.unlink()
    whole.unlink()
    return path


def test_probe_counts_frames_of_truncated_video(tmp_path):
    path = write_truncated_video(tmp_path / "cut.mp4", 0.5)
    info = probe_video(path)
    assert 0 < info.num_frames < FRAMES
    assert info.num_frames == len(list(_decoded_frames(path)))


def _decoded_frames(path: Path):
    import av

    with av.open(str(path)) as container:
        yield from container.decode(container.streams.video[0])


def test_pretrain_rejects_truncated_video(tmp_path, cli, video_folder):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "good.mp4").write_bytes((video_folder / "clip0.mp4").read_bytes())
    write_truncated_video(folder / "cut.mp4", 0.5)
    out = tmp_path / "run"
    result = cli("ctp-pretrain", write_recipe(tmp_path / "r.yaml", TINY_PRETRAIN, root=folder), "--out", out)
    assert result.exit_code == 2, result.output
    assert "cut.mp4" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("1 Drift\n1 Still\n2 Other\n", "class id 1 is listed twice"),
        ("1 Drift\n2 Drift\n", "class 'Drift' is listed twice"),
        ("1 Drift\n3 Still\n", "without gaps"),
    ],
)
def test_class_index_rejects_duplicates_and_gaps(tmp_path, lines, message):
    path = tmp_path / "classInd.txt"
    path.write_text(lines)
    with pytest.raises(DataError, match=message):
        read_ucf101_classes(path)


def test_split_list_rejects_non_integer_label(tmp_path, ucf_dataset):
    root, splits = ucf_dataset
    bad = tmp_path / "splits"
    bad.mkdir()
    (bad / "classInd.txt").write_text((splits / "classInd.txt").read_text())
    (bad / "trainlist01.txt").write_text("Drift/v_Drift_g00.mp4 one\n")
    with pytest.raises(DataError, match="'one' is not a class id"):
        read_ucf101_split(root, bad, "train")


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    """A backbone.pt as ctp-pretrain writes it, for a randomly initialised tiny R3D-10."""
    from mmtk.core.recipe import build
    from mmtk.ctp.backbones import PRETRAIN_STRIDES, VideoResNet
    from mmtk.ctp.pretrain import PretrainRecipe, save_backbone

    recipe = build(PretrainRecipe, {"backbone": TINY_PRETRAIN["backbone"]}, "recipe")
    path = tmp_path_factory.mktemp("backbone") / "backbone.pt"
    save_backbone(path, VideoResNet(recipe.backbone, PRETRAIN_STRIDES), recipe, step=0)
    return path


def _evaluate(cli, tmp_path, ucf_dataset, *overrides):
    root, splits = ucf_dataset
    recipe = write_recipe(tmp_path / "e.yaml", TINY_EVALUATE, root=root, splits=splits)
    return cli("ctp-evaluate", recipe, *overrides, "--out", tmp_path / "eval")


def test_evaluate_rejects_truncated_backbone(tmp_path, cli, ucf_dataset, backbone_file):
    cut = tmp_path / "backbone.pt"
    cut.write_bytes(backbone_file.read_bytes()[:5000])
    result = _evaluate(cli, tmp_path, ucf_dataset, f"checkpoint={cut}")
    assert result.exit_code == 2, result.output
    assert "truncated" in result.output
    assert not (tmp_path / "eval").exists()


def test_evaluate_rejects_weights_of_other_shape(tmp_path, cli, ucf_dataset, backbone_file):
    state = torch.load(backbone_file, weights_only=True)
    state["backbone"]["widths"] = [8, 8, 8, 8]
    edited = tmp_path / "backbone.pt"
    torch.save(state, edited)
    result = _evaluate(cli, tmp_path, ucf_dataset, f"checkpoint={edited}")
    assert result.exit_code == 2, result.output
    assert "do not fit" in result.output
    assert not (tmp_path / "eval").exists()


def test_evaluate_rejects_batch_larger_than_train_split(tmp_path, cli, ucf_dataset):
    result = _evaluate(cli, tmp_path, ucf_dataset, "inits=[random]", "finetune.train.batch_size=5")
    assert result.exit_code == 2, result.output
    assert "finetune.train.batch_size=5" in result.output
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("kind", ["folder", "text file"])
def test_pretrain_rejects_cache_path_that_is_not_a_cache(tmp_path, cli, video_folder, kind):
    cache = tmp_path / "cache.h5"
    if kind == "folder":
        cache.mkdir()
    else:
        cache.write_text("notes that must survive\n")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", TINY_PRETRAIN, root=video_folder, cache=cache)
    result = cli("ctp-pretrain", recipe, "--out", out)
    assert result.exit_code == 2, result.output
    assert "data.cache" in result.output
    assert not out.exists()
    if kind == "text file":
        assert cache.read_text() == "notes that must survive\n"


def test_evaluate_rejects_cache_path_that_is_a_folder(tmp_path, cli, ucf_dataset):
    (tmp_path / "cache-test.h5").mkdir()
    result = _evaluate(cli, tmp_path, ucf_dataset, "inits=[random]", f"data.cache={tmp_path / 'cache.h5'}")
    assert result.exit_code == 2, result.output
    assert "is a folder" in result.output
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("line", ["v_Drift_g00.mp4", "v_Drift_g00.mp4 3", "v_Drift_g00.mp4 1 extra"])
def test_hmdb51_split_rejects_malformed_line(tmp_path, ucf_dataset, line):
    root, _ = ucf_dataset
    (tmp_path / "Drift_test_split1.txt").write_text(f"v_Drift_g01.mp4 1\n{line}\n")
    with pytest.raises(DataError, match="line 2"):
        read_hmdb51_split(root, tmp_path, "train")


def test_evaluate_rejects_non_finite_weights(tmp_path, cli, ucf_dataset, backbone_file):
    state = torch.load(backbone_file, weights_only=True)
    key = next(iter(state["state_dict"]))
    state["state_dict"][key].fill_(float("nan"))
    edited = tmp_path / "backbone.pt"
    torch.save(state, edited)
    result = _evaluate(cli, tmp_path, ucf_dataset, f"checkpoint={edited}")
    assert result.exit_code == 2, result.output
    assert key in result.output
    assert not (tmp_path / "eval").exists()


def test_evaluate_rejects_recall_at_zero(tmp_path, cli, ucf_dataset):
    result = _evaluate(cli, tmp_path, ucf_dataset, "inits=[random]", "probe.recall_at=[0,1]")
    assert result.exit_code == 2, result.output
    assert "recall_at" in result.output
    assert not (tmp_path / "eval").exists()


def test_clip_cache_read_detects_damaged_chunk(tmp_path, video_folder):
    import h5py

    from mmtk.ctp.video import ClipCache, build_clip_cache, list_video_folder

    path = build_clip_cache(tmp_path / "cache.h5", list_video_folder(video_folder)[:1], short_side=32)
    with h5py.File(path, "r") as handle:
        chunk = handle["videos/0"].id.get_chunk_info(3)
    with open(path, "r+b") as stream:
        stream.seek(chunk.byte_offset + 100)
        stream.write(bytes(200))  # zeros over pixels of frame 3

    cache = ClipCache(path)
    try:
        assert cache.read(0, np.array([0, 1])).shape[0] == 2  # undamaged chunks still read
        with pytest.raises(DataError, match="damaged"):
            cache.read(0, np.array([2, 3]))
    finally:
        cache.close()


def _edited_backbone(tmp_path: Path, backbone_file: Path, **entries) -> Path:
    """Write a copy of ``backbone_file`` with ``entries`` replaced and return its path."""
    state = torch.load(backbone_file, weights_only=True)
    state.update(entries)
    edited = tmp_path / "backbone.pt"
    torch.save(state, edited)
    return edited


def test_evaluate_rejects_state_dict_of_text(tmp_path, cli, ucf_dataset, backbone_file):
    edited = _edited_backbone(tmp_path, backbone_file, state_dict="abc")
    result = _evaluate(cli, tmp_path, ucf_dataset, f"checkpoint={edited}")
    assert result.exit_code == 2, result.output
    assert "not a valid backbone.pt" in result.output
    assert "mapping" in result.output
    assert not (tmp_path / "eval").exists()


def test_evaluate_rejects_unknown_backbone_format(tmp_path, cli, ucf_dataset, backbone_file):
    edited = _edited_backbone(tmp_path, backbone_file, format=99)
    result = _evaluate(cli, tmp_path, ucf_dataset, f"checkpoint={edited}")
    assert result.exit_code == 2, result.output
    assert "unsupported format version 99" in result.output
    assert "format version 1 only" in result.output
    assert "checkpoints/" not in result.output
    assert not (tmp_path / "eval").exists()


def test_evaluate_extra_key_single_full_stop(tmp_path, cli, ucf_dataset, backbone_file):
    state_dict = torch.load(backbone_file, weights_only=True)["state_dict"]
    edited = _edited_backbone(tmp_path, backbone_file, state_dict={**state_dict, "extra.weight": torch.zeros(2)})
    result = _evaluate(cli, tmp_path, ucf_dataset, f"checkpoint={edited}")
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())  # the console may wrap long lines
    assert '"extra.weight". Pass an unmodified backbone.pt' in output
    assert ". ." not in output
    assert not (tmp_path / "eval").exists()


def test_pretrain_rejects_scale_larger_than_crop(tmp_path, cli, video_folder):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", TINY_PRETRAIN, root=video_folder)
    result = cli("ctp-pretrain", recipe, "proxy.scales=[6,100]", "--out", out)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "proxy.scales contains 100" in output
    assert "clips.crop_size=32" in output
    assert not out.exists()


def test_evaluate_rejects_clip_longer_than_smoke_videos(tmp_path, cli, monkeypatch):
    from mmtk.ctp import smoke

    def fail_if_built(*args, **kwargs):
        raise AssertionError("the smoke data set was built before the clip length was checked")

    monkeypatch.setattr(smoke, "build_smoke_dataset", fail_if_built)
    recipe = write_recipe(tmp_path / "e.yaml", TINY_EVALUATE)
    out = tmp_path / "eval"
    result = cli("ctp-evaluate", recipe, "inits=[random]", "view.num_frames=64", "--out", out)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "view.num_frames=64" in output
    assert f"{smoke.SMOKE_SEGMENT_FRAMES} frames" in output
    assert "smoke data set" in output
    assert "/tmp/" not in output
    assert not out.exists()


def test_pretrain_rejects_root_that_is_a_video_file(tmp_path, cli, video_folder):
    out = tmp_path / "run"
    video = video_folder / "clip0.mp4"
    result = cli("ctp-pretrain", write_recipe(tmp_path / "r.yaml", TINY_PRETRAIN, root=video), "--out", out)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "is a file, not a folder" in output
    assert str(video_folder) in "".join(result.output.split())  # line wrapping may split the path
    assert not out.exists()


def test_evaluate_rejects_root_that_is_a_video_file(tmp_path, cli, ucf_dataset):
    root, splits = ucf_dataset
    video = next(root.rglob("*.mp4"))
    recipe = write_recipe(tmp_path / "e.yaml", TINY_EVALUATE, root=video, splits=splits)
    result = cli("ctp-evaluate", recipe, "inits=[random]", "--out", tmp_path / "eval")
    assert result.exit_code == 2, result.output
    assert "is a file, not a folder" in " ".join(result.output.split())
    assert not (tmp_path / "eval").exists()


def test_pretrain_rejects_empty_video_file(tmp_path, cli, video_folder):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "good.mp4").write_bytes((video_folder / "clip0.mp4").read_bytes())
    (folder / "empty.mp4").write_bytes(b"")
    out = tmp_path / "run"
    result = cli("ctp-pretrain", write_recipe(tmp_path / "r.yaml", TINY_PRETRAIN, root=folder), "--out", out)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "empty.mp4 is empty (0 bytes)" in output
    assert "Errno" not in output
    assert not out.exists()
