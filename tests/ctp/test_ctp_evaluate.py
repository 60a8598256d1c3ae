"""Evaluation metrics, the linear probe and the smoke data set."""

from __future__ import annotations

import pytest
import torch

from mmtk.ctp.evaluate import fit_logistic_regression, recall_at_k, topk_accuracy


def test_topk_accuracy_hand_case():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 5) == 1.0  # k is capped at the number of classes


def test_recall_at_k_hand_case():
    gallery = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]), dim=1)
    gallery_labels = torch.tensor([0, 1, 2])
    query = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), dim=1)
    # Query 0 ranks the gallery 0, 2, 1; query 1 ranks it 1, 2, 0.
    recalls = recall_at_k(query, torch.tensor([2, 0]), gallery, gallery_labels, [1, 2, 3])
    assert recalls == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0}


def test_logistic_regression_separates_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(20)
    features = centres[labels] + 0.5 * torch.randn(60, 2, generator=generator, dtype=torch.float64)
    model = fit_logistic_regression(features, labels, 3, l2=1e-3, max_iter=100)
    with torch.no_grad():
        accuracy = (model(features).argmax(dim=1) == labels).double().mean().item()
    assert accuracy == 1.0


def test_smoke_data_set_layout(tmp_path):
    from mmtk.ctp.smoke import build_smoke_dataset
    from mmtk.ctp.video import probe_video, read_ucf101_split

    videos, splits = build_smoke_dataset(tmp_path)
    train, classes = read_ucf101_split(videos, splits, "train")
    test, _ = read_ucf101_split(videos, splits, "test")
    assert classes == ["BigBuckBunny", "Bikes", "Carphone"]
    assert (len(train), len(test)) == (12, 5)
    assert sorted({r.label for r in test}) == [0, 1, 2]
    assert probe_video(test[0].path).num_frames == 32
