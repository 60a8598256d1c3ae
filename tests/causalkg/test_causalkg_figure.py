"""The drawn network: nodes, edge labels and titles must not overlap or be cut off."""

from __future__ import annotations

import itertools

import pytest

from mmtk.causalkg.network import CausalKnowledgeNetwork, draw_network, network_figure

# The FrcSub network as learned by the bundled recipe, whose first drawing had overlapping nodes and labels.
FRCSUB_EDGES = [("K1", "K5"), ("K2", "K1"), ("K2", "K5"), ("K2", "K8"), ("K4", "K1"), ("K5", "K3"), ("K6", "K1"), ("K6", "K4"), ("K6", "K5"), ("K7", "K2"), ("K7", "K4"), ("K7", "K6"), ("K7", "K8")]
ARITHMETIC_EDGES = [("number_sense", "addition"), ("addition", "subtraction"), ("addition", "multiplication"), ("multiplication", "division"), ("subtraction", "fractions"), ("division", "fractions")]


def make_network(edges):
    names = sorted({n for edge in edges for n in edge})
    skills = [{"name": n, "description": f"description of {n} " * 4, "mastery_rate": 0.1 * (k + 1)} for k, n in enumerate(names)]
    records = [{"parent": u, "child": v, "effect": 0.5, "ci_low": 0.4, "ci_high": 0.6, "frequency": 1.0, "direction_frequency": 1.0} for u, v in edges]
    return CausalKnowledgeNetwork(skills, records, [], {}, {}, 0.8)


def overlaps(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("edges", [FRCSUB_EDGES, ARITHMETIC_EDGES], ids=["frcsub", "arithmetic"])
def test_nodes_and_labels_do_not_overlap(edges):
    import matplotlib.pyplot as plt

    figure, nodes, labels = network_figure(make_network(edges))
    renderer = figure.canvas.get_renderer()
    node_boxes = {n: t.get_bbox_patch().get_window_extent(renderer) for n, t in nodes.items()}
    label_boxes = {e: t.get_bbox_patch().get_window_extent(renderer) for e, t in labels.items()}
    for (a, box_a), (b, box_b) in itertools.combinations(node_boxes.items(), 2):
        assert not overlaps(box_a, box_b), (a, b)
    for (a, box_a), (b, box_b) in itertools.combinations(label_boxes.items(), 2):
        assert not overlaps(box_a, box_b), (a, b)
    for (edge, label), (node, box) in itertools.product(label_boxes.items(), node_boxes.items()):
        assert not overlaps(label, box), (edge, node)

    # Every name fits inside its node box.
    for name, text in nodes.items():
        inner = text.get_window_extent(renderer)
        assert node_boxes[name].x0 <= inner.x0, name
        assert inner.x1 <= node_boxes[name].x1, name

    # A colour bar beside the graph, and the title inside the figure.
    assert len(figure.axes) == 2
    title = figure.axes[0].title.get_window_extent(renderer)
    assert title.x0 >= 0
    assert title.x1 <= figure.bbox.x1
    plt.close(figure)


def test_saved_image_contains_every_text(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    network = make_network(FRCSUB_EDGES)
    path = draw_network(network, tmp_path / "network.png")
    figure, _, _ = network_figure(network)
    renderer = figure.canvas.get_renderer()
    tight = figure.get_tightbbox(renderer)
    graph_axes, bar_axes = figure.axes
    texts = [t for t in (*graph_axes.texts, graph_axes.title, bar_axes.yaxis.label) if t.get_text()]
    assert len(texts) == 8 + len(FRCSUB_EDGES) + 3  # nodes, edge labels, legend, title, colour bar label
    for text in texts:
        extent = text.get_window_extent(renderer).transformed(figure.dpi_scale_trans.inverted())
        assert extent.x0 >= tight.x0 - 1e-6, text.get_text()
        assert extent.x1 <= tight.x1 + 1e-6, text.get_text()
        assert extent.y0 >= tight.y0 - 1e-6, text.get_text()
        assert extent.y1 <= tight.y1 + 1e-6, text.get_text()
    width, height = Image.open(path).size
    assert width == pytest.approx((tight.width + 0.3) * 110, abs=3)
    plt.close(figure)
