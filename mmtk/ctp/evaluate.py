"""``mmtk ctp-evaluate``: judge a video backbone by fine-tuning, a linear probe and clip retrieval.

Each protocol runs once per initialisation in ``inits``: ``pretrained``
(weights from a ``ctp-pretrain`` ``backbone.pt``) and ``random`` (the same
architecture, freshly initialised), so the two can be compared in one run.

- Fine-tuning: backbone (fine-tuning strides), global average pool, dropout
  and a linear classifier, trained with the shared trainer. The test scores
  average the softmax over ``view.test_clips`` uniformly spaced clips per
  video. Reports top-1 and top-5 accuracy.
- Linear probe: the frozen backbone's pooled features (512-d), averaged
  over the test clips and L2-normalised, train a multinomial logistic
  regression (L-BFGS, L2 penalty) on the train split. Reports top-1 and
  top-5 on the test split.
- Retrieval: the same features; each test video queries the train videos
  by cosine similarity; Recall@k is the fraction of queries with a
  same-class video among the top k.

Accuracies at k >= the number of classes are 1 by construction.

Run-folder files besides the core's: ``results/<init>-<protocol>.json``
(the metrics of each finished protocol), ``features-<init>.h5`` (schema
``mmtk.ctp.features/1``: the frozen backbone's L2-normalised features
``train_features`` [N_train, C] and ``test_features`` [N_test, C] in
float64, with ``train_labels`` and ``test_labels`` int64), ``finetune-<init>/``
(the fine-tuning run with its checkpoints) and the clip caches. With
``--resume`` a finished protocol is read back from ``results/`` instead of
being recomputed, stored features are reused, and an interrupted
fine-tuning run continues from its latest checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmtk.core import distributed
from mmtk.core.checkpoint import latest_checkpoint, load_checkpoint
from mmtk.core.errors import InputError, RecipeError
from mmtk.core.hdf5 import DatasetSpec, read_datasets, write_datasets
from mmtk.core.io import write_json
from mmtk.core.logging import get_logger
from mmtk.core.recipe import build, param
from mmtk.core.rundir import RunDir
from mmtk.core.runner import RunContext
from mmtk.core.seeding import seed_everything
from mmtk.core.trainer import Trainer, TrainConfig, TrainingTask
from mmtk.ctp.backbones import FINETUNE_STRIDES, BackboneConfig, VideoResNet
from mmtk.ctp.data import ClipViewConfig, LabelledClips, VideoDataConfig, check_cache_path, open_cache, probe_records, read_records
from mmtk.ctp.pretrain import BACKBONE_FORMAT
from mmtk.ctp.pretrain import TOOL as PRETRAIN_TOOL
from mmtk.ctp.smoke import SMOKE_SEGMENT_FRAMES
from mmtk.ctp.video import ClipCache

log = get_logger(__name__)

TOOL = "ctp-evaluate"
FEATURES_SCHEMA = "mmtk.ctp.features/1"

# Recipe keys that may change on --resume besides the core's run-length keys:
# each (init, protocol) result is computed independently of the others, so
# adding or dropping one leaves the stored results valid.
RESUMABLE_KEYS = frozenset({"inits", "protocols"})


def _finetune_train_config() -> TrainConfig:
    return TrainConfig(steps=150 * 300, batch_size=32, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, grad_clip=40.0, schedule="step", milestones=[60 * 300, 120 * 300], log_every=20, checkpoint_every=1000)


@dataclass
class FinetuneConfig:
    """Fine-tuning for action classification."""

    dropout: float = param(0.5, min=0, max=1, help="dropout before the classifier")
    train: TrainConfig = field(default_factory=_finetune_train_config)


@dataclass
class ProbeConfig:
    """Linear probe and retrieval on frozen features."""

    l2: float = param(1e-3, min=0, help="L2 penalty of the logistic regression (on the weights, per sample)")
    max_iter: int = param(200, min=1, help="L-BFGS iterations of the logistic regression")
    recall_at: list[int] = param(default_factory=lambda: [1, 5, 10], help="k values of Recall@k")
    batch_size: int = param(4, min=1, help="videos per forward pass when extracting features")

    def __post_init__(self) -> None:
        if not self.recall_at or min(self.recall_at) < 1:
            raise ValueError(f"'recall_at' must list positive k values, got {self.recall_at}")


@dataclass
class EvaluateRecipe:
    """Recipe of ``mmtk ctp-evaluate``."""

    seed: int = param(0, help="random seed")
    device: str = param("auto", help="torch device: auto, cpu, cuda or cuda:N")
    threads: Optional[int] = param(None, min=1, help="torch CPU threads per process (torch.set_num_threads); null keeps torch's default")
    checkpoint: Optional[Path] = param(None, help="backbone.pt written by ctp-pretrain; required when inits includes 'pretrained'")
    inits: list[Literal["pretrained", "random"]] = param(default_factory=lambda: ["pretrained", "random"], help="backbone initialisations to evaluate")
    protocols: list[Literal["finetune", "linear_probe", "retrieval"]] = param(default_factory=lambda: ["finetune", "linear_probe", "retrieval"], help="evaluations to run")
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: VideoDataConfig = field(default_factory=lambda: VideoDataConfig(layout="ucf101"))
    view: ClipViewConfig = field(default_factory=ClipViewConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if not self.inits:
            raise ValueError("'inits' must name at least one of pretrained, random")
        if not self.protocols:
            raise ValueError("'protocols' must name at least one of finetune, linear_probe, retrieval")


# ----------------------------------------------------------------- models


def load_pretrained_backbone(path: Path) -> tuple[BackboneConfig, dict[str, torch.Tensor]]:
    """Read a ``backbone.pt`` of ctp-pretrain: (architecture, state dict). Raises InputError for other files."""
    try:
        state = load_checkpoint(path, expected_tool=PRETRAIN_TOOL)
    except OSError as exc:
        # torch.load raises OSError for some truncated zip archives, which load_checkpoint does not catch.
        raise InputError(f"cannot load checkpoint {path} (corrupt or truncated): {exc}. Pass a complete backbone.pt of ctp-pretrain.") from exc
    check_backbone_entries(path, state)
    try:
        config = build(BackboneConfig, state["backbone"], "backbone")
    except InputError as exc:
        raise InputError(f"{path} describes an invalid backbone: {exc}") from exc
    for key, value in state["state_dict"].items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputError(f"{path}: weight {key!r} contains NaN or infinite values, so the pretraining run diverged. Pass the backbone.pt of a run that finished with finite losses.")
    try:
        make_backbone(config, state["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        # torch's load_state_dict text may end in a full stop, and this message adds its own.
        detail = str(exc).strip().rstrip(".")
        raise InputError(f"the weights in {path} do not fit the backbone it describes ({config.arch}-{config.depth}, widths {config.widths}): {detail}. Pass an unmodified backbone.pt of ctp-pretrain.") from exc
    return config, state["state_dict"]


def check_backbone_entries(path: Path, state: Mapping[str, Any]) -> None:
    """Raise InputError unless ``state`` contains the format version, architecture and state dict of a backbone.pt."""
    if "state_dict" not in state or "backbone" not in state:
        raise InputError(f"{path} is a ctp-pretrain checkpoint but not a backbone file; pass the run's backbone.pt, not a file from checkpoints/.")
    if state.get("format") != BACKBONE_FORMAT:
        found = f"format version {state['format']!r}" if "format" in state else "no format version"
        raise InputError(
            f"{path} is a backbone file of unsupported {found}. This version of mmtk reads format version {BACKBONE_FORMAT} only. "
            "Pass a backbone.pt written by the ctp-pretrain of this mmtk version."
        )
    if not isinstance(state["state_dict"], Mapping):
        raise InputError(
            f"{path} is not a valid backbone.pt: its state_dict is a {type(state['state_dict']).__name__}, not a mapping of parameter names to tensors. "
            "Pass an unmodified backbone.pt of ctp-pretrain."
        )


class ClipClassifier(nn.Module):
    """Backbone, global average pool, dropout and a linear layer: clip [B, 3, T, H, W] -> logits [B, classes]."""

    def __init__(self, backbone: VideoResNet, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.out_channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)

    def features(self, clip: torch.Tensor) -> torch.Tensor:
        """Return pooled features [B, C]."""
        return self.backbone(clip).mean(dim=(2, 3, 4))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(clip)))


def make_backbone(config: BackboneConfig, state_dict: dict[str, torch.Tensor] | None) -> VideoResNet:
    """Build a fine-tuning-stride backbone, loading ``state_dict`` when given."""
    backbone = VideoResNet(config, FINETUNE_STRIDES)
    if state_dict is not None:
        backbone.load_state_dict(state_dict)
    return backbone


# ---------------------------------------------------------------- metrics


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Return the fraction of rows of ``scores`` [N, classes] whose top ``k`` contains the label."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # [N, k]
    return float((top == labels[:, None]).any(dim=1).float().mean())


def recall_at_k(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor, gallery_labels: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Return Recall@k of cosine-similarity retrieval (L2-normalised features [N, D] and [M, D])."""
    similarity = query @ gallery.T  # [N, M]
    order = similarity.argsort(dim=1, descending=True)
    hits = gallery_labels[order] == query_labels[:, None]  # [N, M]
    return {f"R@{k}": float(hits[:, : min(k, hits.shape[1])].any(dim=1).float().mean()) for k in ks}


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> nn.Linear:
    """Fit multinomial logistic regression on features [N, D] with L-BFGS; returns the linear layer."""
    model = nn.Linear(features.shape[1], num_classes).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x = features.double()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), labels) + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


# ------------------------------------------------------------ fine-tuning


class FinetuneTask(TrainingTask):
    """Action classification fine-tuning as a :class:`TrainingTask`."""

    def __init__(self, backbone_config: BackboneConfig, state_dict: dict[str, torch.Tensor] | None, num_classes: int, dropout: float, train_set: LabelledClips) -> None:
        self.backbone_config = backbone_config
        self.state_dict = state_dict
        self.num_classes = num_classes
        self.dropout = dropout
        self.train_set = train_set

    def build_model(self) -> nn.Module:
        from mmtk.ctp.backbones import maybe_sync_batchnorm

        return maybe_sync_batchnorm(ClipClassifier(make_backbone(self.backbone_config, self.state_dict), self.num_classes, self.dropout))

    def train_dataset(self) -> LabelledClips:
        return self.train_set

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
        logits = model(batch["clip"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        return loss, {"accuracy": accuracy}


@torch.no_grad()
def multi_clip_outputs(model: ClipClassifier, dataset: LabelledClips, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run every test-mode item: returns (mean softmax scores [N, classes], mean features [N, C], labels [N])."""
    model.eval()
    scores, features, labels = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        clips = torch.stack([item["clip"] for item in items]).to(device)  # [B, K, 3, T, S, S]
        batch, clips_per_video = clips.shape[:2]
        pooled = model.features(clips.flatten(0, 1)).view(batch, clips_per_video, -1)  # [B, K, C]
        scores.append(model.fc(pooled).softmax(dim=-1).mean(dim=1).cpu())
        features.append(pooled.mean(dim=1).cpu())
        labels.extend(int(item["label"]) for item in items)
    return torch.cat(scores), torch.cat(features), torch.tensor(labels)


# -------------------------------------------------------------------- run


@dataclass
class EvaluationData:
    """Validated input: records of both splits, class names, the data section used and whether it is the smoke set."""

    train_records: list
    test_records: list
    classes: list[str]
    config: VideoDataConfig
    smoke: bool


def check_smoke_clip_length(view: ClipViewConfig) -> None:
    """Raise RecipeError if a clip of ``view`` is longer than the videos of the smoke data set."""
    if view.num_frames > SMOKE_SEGMENT_FRAMES:
        raise RecipeError(
            f"view.num_frames={view.num_frames} is more than the {SMOKE_SEGMENT_FRAMES} frames of each video in the built-in smoke data set (data.root=null). "
            f"Set view.num_frames to at most {SMOKE_SEGMENT_FRAMES}, or set data.root and data.splits to your own labelled videos."
        )


def prepare_data(recipe: EvaluateRecipe, smoke_root: Path) -> EvaluationData:
    """List and probe the labelled videos; for ``data.root=null`` build the smoke data set under ``smoke_root``.

    The recipe is left unchanged, so the stored recipe keeps ``data.root:
    null`` and a resumed run compares equal to it.
    """
    config = recipe.data
    smoke = config.root is None
    if smoke:
        from mmtk.ctp.smoke import build_smoke_dataset

        check_smoke_clip_length(recipe.view)
        video_root, split_root = build_smoke_dataset(smoke_root)
        config = VideoDataConfig(root=video_root, layout="ucf101", splits=split_root, split=1, cache=config.cache)
    return _read_data(config, recipe.view.num_frames, smoke)


def _read_data(config: VideoDataConfig, span: int, smoke: bool) -> EvaluationData:
    if config.layout == "folder":
        raise InputError("ctp-evaluate needs labelled videos: set data.layout to ucf101 or hmdb51 and data.splits to the split lists.")
    train_records, classes = read_records(config, config.root, "train")
    test_records, _ = read_records(config, config.root, "test")
    probe_records(train_records, span)
    probe_records(test_records, span)
    return EvaluationData(train_records, test_records, classes, config, smoke)


def _smoke_config(folder: Path, recipe: EvaluateRecipe) -> VideoDataConfig:
    return VideoDataConfig(root=folder / "videos", layout="ucf101", splits=folder / "splits", split=1, cache=recipe.data.cache)


def _install_smoke_data(run: RunDir, staged: Path, recipe: EvaluateRecipe) -> EvaluationData:
    """Move the staged smoke data set into the run folder and read it there."""
    final = run.file("smoke-data")
    if run.writer:
        # Copy under a temporary name, then rename, so a crash never leaves a half-copied data set to reuse.
        partial = run.file("smoke-data.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(staged), partial)
        partial.rename(final)
    distributed.barrier()
    return _read_data(_smoke_config(final, recipe), recipe.view.num_frames, smoke=True)


def run(context: RunContext) -> dict[str, Any]:
    """Validate, then run each protocol for each initialisation and write the summary.

    With ``--resume`` the protocols already stored in ``results/`` are read
    back, and the others are computed.
    """
    recipe: EvaluateRecipe = context.recipe
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    if "pretrained" in recipe.inits and recipe.checkpoint is None:
        raise InputError("inits includes 'pretrained' but checkpoint is not set. Pass checkpoint=<ctp-pretrain run>/backbone.pt, or inits=[random].")
    if recipe.data.root is None:
        check_smoke_clip_length(recipe.view)
    pretrained = load_pretrained_backbone(recipe.checkpoint) if recipe.checkpoint is not None else None
    backbone_config = pretrained[0] if pretrained is not None else recipe.backbone

    # Under torchrun, join the process group first: rank 0 alone writes the shared files below.
    device = distributed.resolve_device(recipe.device)
    distributed.init_distributed(device.type)

    # The smoke data set is built in a temporary folder first, so that a rejected run writes nothing.
    # A resumed run reuses the one in its run folder.
    resumed_smoke = context.run.file("smoke-data")
    reuse_smoke = recipe.data.root is None and context.run.resume and resumed_smoke.is_dir()
    staging = Path(tempfile.mkdtemp(prefix="mmtk-ctp-smoke-"))
    try:
        if reuse_smoke:
            data = _read_data(_smoke_config(resumed_smoke, recipe), recipe.view.num_frames, smoke=True)
        else:
            data = prepare_data(recipe, staging / "smoke-data")
        batch_size = recipe.finetune.train.batch_size
        if "finetune" in recipe.protocols and len(data.train_records) < batch_size:
            raise InputError(f"the train split has {len(data.train_records)} videos, fewer than finetune.train.batch_size={batch_size}; lower the batch size.")
        if recipe.data.cache is not None:
            check_cache_path(recipe.data.cache)
            check_cache_path(_sibling(recipe.data.cache, "test"))
        context.start()
        if data.smoke and not reuse_smoke:
            data = _install_smoke_data(context.run, staging / "smoke-data", recipe)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    cache_dir = context.run.path
    train_cache_path = recipe.data.cache or cache_dir / "clip-cache-train.h5"
    test_cache_path = _sibling(recipe.data.cache, "test") if recipe.data.cache else cache_dir / "clip-cache-test.h5"
    if distributed.is_main_process():
        open_cache(train_cache_path, data.train_records, recipe.view.cache_short_side)
        open_cache(test_cache_path, data.test_records, recipe.view.cache_short_side)
    distributed.barrier()
    train_cache = ClipCache(train_cache_path)
    test_cache = ClipCache(test_cache_path)
    splits = _Splits(train_cache, test_cache, [r.label for r in data.train_records], [r.label for r in data.test_records], len(data.classes))

    results: dict[str, dict[str, Any]] = {}
    for init in recipe.inits:
        state_dict = pretrained[1] if init == "pretrained" and pretrained is not None else None
        results[init] = {}
        if "linear_probe" in recipe.protocols or "retrieval" in recipe.protocols:
            results[init].update(_frozen_protocols(context, recipe, init, backbone_config, state_dict, splits, device))
        if "finetune" in recipe.protocols:
            results[init]["finetune"] = _finetune(context, recipe, init, backbone_config, state_dict, splits, device)

    summary = {
        "classes": splits.num_classes,
        "train_videos": len(data.train_records),
        "test_videos": len(data.test_records),
        "smoke_data_set": data.smoke,
        "backbone": {"arch": backbone_config.arch, "depth": backbone_config.depth, "widths": backbone_config.widths},
        "checkpoint": str(recipe.checkpoint) if recipe.checkpoint else None,
        "results": results,
    }
    _print_results(context, summary)
    return summary


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}-{suffix}{path.suffix}")


@dataclass
class _Splits:
    """Clip caches and labels of the train and test splits."""

    train_cache: ClipCache
    test_cache: ClipCache
    train_labels: list[int]
    test_labels: list[int]
    num_classes: int


# ------------------------------------------------------- stored results


def _result_path(run: RunDir, init: str, protocol: str) -> Path:
    return run.file(f"results/{init}-{protocol}.json")


def load_result(run: RunDir, init: str, protocol: str, steps: int | None = None) -> dict[str, Any] | None:
    """Return the stored metrics of a finished protocol, or None when a resumed run must compute them.

    Only a resumed run reads stored results. A fine-tuning result counts as
    finished only when it was trained for ``steps`` optimizer steps, so a
    resume that raises ``finetune.train.steps`` continues the training.
    """
    path = _result_path(run, init, protocol)
    if not run.resume or not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("stored result %s is unreadable (%s); computing %s for %s again", path, exc, protocol, init)
        return None
    metrics = stored.get("metrics")
    if not isinstance(metrics, dict):
        log.warning("stored result %s contains no metrics; computing %s for %s again", path, protocol, init)
        return None
    if steps is not None and metrics.get("steps") != steps:
        log.info("stored %s result for %s is at step %s, the recipe sets train.steps=%d; continuing the training", protocol, init, metrics.get("steps"), steps)
        return None
    log.info("reusing the stored %s result for %s from %s", protocol, init, path)
    return metrics


def store_result(run: RunDir, init: str, protocol: str, metrics: dict[str, Any]) -> None:
    """Write the metrics of a finished protocol to ``results/<init>-<protocol>.json`` (rank 0 only, atomic)."""
    if run.writer:
        write_json(_result_path(run, init, protocol), {"init": init, "protocol": protocol, "metrics": metrics})


_FEATURE_SPECS = {
    "train_features": DatasetSpec(("n_train", "channels"), "f"),
    "test_features": DatasetSpec(("n_test", "channels"), "f"),
    "train_labels": DatasetSpec(("n_train",), "i"),
    "test_labels": DatasetSpec(("n_test",), "i"),
}


def _frozen_features(context, recipe, init, backbone_config, state_dict, splits: _Splits, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return L2-normalised float64 features and labels of both splits: ([N_train, C], [N_train], [N_test, C], [N_test]).

    A resumed run reads them from ``features-<init>.h5`` when present;
    otherwise they are extracted and stored there.
    """
    path = context.run.file(f"features-{init}.h5")
    if context.run.resume and path.is_file():
        arrays, _ = read_datasets(path, _FEATURE_SPECS, schema=FEATURES_SCHEMA)
        log.info("reusing the stored %s features from %s", init, path)
        tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
        return tensors["train_features"], tensors["train_labels"], tensors["test_features"], tensors["test_labels"]

    seed_everything(recipe.seed)
    model = ClipClassifier(make_backbone(backbone_config, state_dict), splits.num_classes, 0.0).to(device)
    _, train_features, train_y = multi_clip_outputs(model, LabelledClips(splits.train_cache, splits.train_labels, recipe.view, "test"), recipe.probe.batch_size, device)
    _, test_features, test_y = multi_clip_outputs(model, LabelledClips(splits.test_cache, splits.test_labels, recipe.view, "test"), recipe.probe.batch_size, device)
    train_features = F.normalize(train_features.double(), dim=1)
    test_features = F.normalize(test_features.double(), dim=1)
    if context.run.writer:
        datasets = {"train_features": train_features.numpy(), "test_features": test_features.numpy(), "train_labels": train_y.numpy(), "test_labels": test_y.numpy()}
        write_datasets(path, datasets, schema=FEATURES_SCHEMA, attrs={"init": init})
    return train_features, train_y, test_features, test_y


def _frozen_protocols(context, recipe, init, backbone_config, state_dict, splits: _Splits, device) -> dict[str, Any]:
    requested = [protocol for protocol in ("linear_probe", "retrieval") if protocol in recipe.protocols]
    output: dict[str, Any] = {}
    for protocol in requested:
        stored = load_result(context.run, init, protocol)
        if stored is not None:
            output[protocol] = stored
    if len(output) == len(requested):
        return output

    train_features, train_y, test_features, test_y = _frozen_features(context, recipe, init, backbone_config, state_dict, splits, device)
    if "linear_probe" in requested and "linear_probe" not in output:
        log.info("linear probe for %s started", init)
        classifier = fit_logistic_regression(train_features, train_y, splits.num_classes, recipe.probe.l2, recipe.probe.max_iter)
        with torch.no_grad():
            scores = classifier(test_features)
        output["linear_probe"] = {"top1": topk_accuracy(scores, test_y, 1), "top5": topk_accuracy(scores, test_y, 5)}
        store_result(context.run, init, "linear_probe", output["linear_probe"])
    if "retrieval" in requested and "retrieval" not in output:
        output["retrieval"] = recall_at_k(test_features, test_y, train_features, train_y, recipe.probe.recall_at)
        store_result(context.run, init, "retrieval", output["retrieval"])
    return {protocol: output[protocol] for protocol in requested}


def _finetune(context, recipe, init, backbone_config, state_dict, splits: _Splits, device) -> dict[str, Any]:
    train_config = recipe.finetune.train
    stored = load_result(context.run, init, "finetune", steps=train_config.steps)
    if stored is not None:
        return stored

    train_set = LabelledClips(splits.train_cache, splits.train_labels, recipe.view, "train")
    if len(train_set) < train_config.batch_size:
        raise InputError(f"the train split has {len(train_set)} videos, fewer than finetune.train.batch_size={train_config.batch_size}; lower the batch size.")
    task = FinetuneTask(backbone_config, state_dict, splits.num_classes, recipe.finetune.dropout, train_set)
    sub_run = _finetune_run(context, init)
    sub_run.start(recipe)
    try:
        trainer = Trainer(task, train_config, sub_run, seed=recipe.seed, device=device, console=context.console)
        fit = trainer.fit()
    finally:
        sub_run.close()
    model = trainer.model
    scores, _, labels = multi_clip_outputs(model, LabelledClips(splits.test_cache, splits.test_labels, recipe.view, "test"), recipe.probe.batch_size, device)
    metrics = {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "steps": fit["steps"],
        # A run resumed at its last step trains no step and so logs no loss; the metrics file has it.
        "final_train_loss": _last_logged_loss(sub_run),
        "run_dir": str(sub_run.path),
    }
    store_result(context.run, init, "finetune", metrics)
    return metrics


def _finetune_run(context: RunContext, init: str) -> RunDir:
    """Return the fine-tuning run folder of ``init``: resumed when a resumed run left a checkpoint there, else new."""
    path = context.run.file(f"finetune-{init}")
    resume = context.run.resume and latest_checkpoint(path / "checkpoints") is not None
    if context.run.resume and path.exists() and not resume:
        # Stopped before its first checkpoint: nothing to continue, and its partial metrics would be logged twice.
        log.info("fine-tuning of %s left no checkpoint in %s; it starts again from step 0", init, path)
        if context.run.writer:
            shutil.rmtree(path)
    return RunDir(path, TOOL, resume=resume, writer=context.run.writer, resumable_keys=RESUMABLE_KEYS)


def _last_logged_loss(run: RunDir) -> float | None:
    path = run.file("metrics.jsonl")
    if not path.is_file():
        return None
    losses = [record["loss"] for record in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "loss" in record]
    return losses[-1] if losses else None


def _print_results(context: RunContext, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("init", "protocol", "metric", "value", title=f"ctp-evaluate ({summary['classes']} classes{', smoke data set' if summary['smoke_data_set'] else ''})")
    for init, protocols in summary["results"].items():
        for protocol, metrics in protocols.items():
            for name, value in metrics.items():
                if isinstance(value, float):
                    table.add_row(init, protocol, name, f"{value:.4f}")
    context.console.print(table)
