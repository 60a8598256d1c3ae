"""The causal knowledge network: skills, weighted causal edges, tables and the mastery model.

``network.json`` (schema ``mmtk.causal-kg/1``) is self-contained, so
``recommend-path`` needs nothing else:

- ``skills``: list of ``{"name", "description", "mastery_rate"}``;
- ``edges``: retained edges, each ``{"parent", "child", "effect", "ci_low",
  "ci_high", "frequency", "direction_frequency"}``;
- ``dropped_edges``: consensus edges dropped because their effect was below
  the threshold, same fields plus ``"reason"``;
- ``cpds``: per skill ``{"parents", "states", "values"}`` (see
  :func:`mmtk.causalkg.effects.cpd_tables`);
- ``mastery_model``: the fitted mastery model's parameters;
- ``mastery_threshold``: P(mastered) at or above which a skill counts as mastered;
- ``settings``: the structure and effect settings used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from mmtk.core.errors import DataError
from mmtk.core.io import atomic_path, write_json

SCHEMA = "mmtk.causal-kg/1"


@dataclass
class CausalKnowledgeNetwork:
    """A learned causal knowledge network (see the module docstring for the fields)."""

    skills: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    dropped_edges: list[dict[str, Any]]
    cpds: dict[str, dict[str, Any]]
    mastery_model: dict[str, Any]
    mastery_threshold: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def skill_names(self) -> list[str]:
        return [skill["name"] for skill in self.skills]

    def graph(self) -> nx.DiGraph:
        """Return the retained edges as a networkx DiGraph with edge attributes."""
        graph = nx.DiGraph()
        for skill in self.skills:
            graph.add_node(skill["name"], description=skill.get("description", ""))
        for edge in self.edges:
            graph.add_edge(edge["parent"], edge["child"], **{k: v for k, v in edge.items() if k not in ("parent", "child")})
        return graph

    def edge(self, parent: str, child: str) -> dict[str, Any]:
        """Return the record of the retained edge ``parent -> child``."""
        for edge in self.edges:
            if edge["parent"] == parent and edge["child"] == child:
                return edge
        raise KeyError((parent, child))

    def bayesian_network(self):
        """Return the fitted pgmpy DiscreteBayesianNetwork."""
        from mmtk.causalkg.effects import network_from_tables

        return network_from_tables(self.cpds)

    # --------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "skills": self.skills,
            "edges": self.edges,
            "dropped_edges": self.dropped_edges,
            "cpds": self.cpds,
            "mastery_model": self.mastery_model,
            "mastery_threshold": self.mastery_threshold,
            "settings": self.settings,
        }

    def write_json(self, path: Path) -> Path:
        return write_json(path, self.to_dict())

    def write_graphml(self, path: Path) -> Path:
        """Write the retained edges with their weights, and the skills with descriptions, as GraphML."""
        graph = self.graph()
        for _, _, data in graph.edges(data=True):
            for key, value in list(data.items()):
                if value is None:
                    data[key] = float("nan")
        with atomic_path(path) as tmp:
            nx.write_graphml(graph, tmp)
        return path

    @classmethod
    def read(cls, path: Path) -> "CausalKnowledgeNetwork":
        """Read ``network.json``, or the one inside a build-causal-kg run folder."""
        if path.is_dir():
            path = path / "network.json"
        if not path.is_file():
            raise DataError(f"network file not found: {path}. Pass the network.json written by 'mmtk build-causal-kg' or its run folder.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read network file {path}: {exc}.") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DataError(f"{path} is not a causal knowledge network (schema {found!r}, expected {SCHEMA!r}). Pass the network.json written by 'mmtk build-causal-kg'.")
        try:
            return cls(
                skills=data["skills"],
                edges=data["edges"],
                dropped_edges=data["dropped_edges"],
                cpds=data["cpds"],
                mastery_model=data["mastery_model"],
                mastery_threshold=float(data["mastery_threshold"]),
                settings=data.get("settings", {}),
            )
        except KeyError as exc:
            raise DataError(f"network file {path} lacks the key {exc}; it is truncated or was edited. Rebuild it with 'mmtk build-causal-kg'.") from exc


def draw_network(network: CausalKnowledgeNetwork, path: Path, title: str = "") -> Path:
    """Draw the network for a teacher: prerequisites to the left, arrows labelled with effect and bootstrap frequency.

    Node colour is the share of students who master the skill, arrow width
    grows with the effect, and a legend lists the skill descriptions.
    Written as PNG or SVG by the suffix of ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph = network.graph()
    positions = _layered_layout(graph)
    names = network.skill_names
    described = [s for s in network.skills if s.get("description")]
    n_layers = 1 + max(nx.get_node_attributes(graph, "layer").values(), default=0)
    figure, axes = plt.subplots(figsize=(max(7.0, 1.6 * n_layers), 5.5 + 0.2 * len(described)))

    rates = {s["name"]: s.get("mastery_rate", 0.5) for s in network.skills}
    widths = [1.0 + 5.0 * abs(graph.edges[e].get("effect", 0.0)) for e in graph.edges]
    # Curved arrows keep an edge that skips a layer visible behind the nodes it passes.
    style = "arc3,rad=0.25"
    nx.draw_networkx_nodes(graph, positions, nodelist=names, node_color=[rates[n] for n in names], cmap="YlGn", vmin=0, vmax=1, node_size=1500, edgecolors="black", ax=axes)
    nx.draw_networkx_labels(graph, positions, font_size=9, ax=axes)
    nx.draw_networkx_edges(graph, positions, width=widths, arrowsize=16, node_size=1500, edge_color="#4a4a4a", connectionstyle=style, ax=axes)
    labels = {e: f"{graph.edges[e]['effect']:+.2f} ({100 * graph.edges[e]['frequency']:.0f}%)" for e in graph.edges}
    nx.draw_networkx_edge_labels(graph, positions, edge_labels=labels, font_size=7, connectionstyle=style, bbox={"boxstyle": "round", "fc": "white", "ec": "none", "alpha": 0.8}, ax=axes)

    axes.set_title(title or "Causal knowledge network\narrow: prerequisite -> skill; label: causal effect (ACE) and bootstrap frequency; colour: share of students with mastery", fontsize=9)
    axes.axis("off")
    heights = [y for _, y in positions.values()] or [0.0]
    axes.set_ylim(min(heights) - 1.2, max(heights) + 1.2)
    axes.set_xlim(-0.6, n_layers - 0.4)
    if described:
        legend = "\n".join(f"{s['name']}: {s['description']}" for s in described)
        figure.text(0.01, 0.01, legend, fontsize=8, va="bottom", ha="left", family="monospace")
        figure.subplots_adjust(bottom=min(0.45, 0.05 + 0.035 * len(described)))

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(figure)
    return path


def _layered_layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    # Layer = longest path from a root, so every prerequisite is drawn left of its dependants.
    for node in nx.topological_sort(graph):
        parents = list(graph.predecessors(node))
        graph.nodes[node]["layer"] = 1 + max(graph.nodes[p]["layer"] for p in parents) if parents else 0
    layers: dict[int, list[str]] = {}
    for node in sorted(graph.nodes):
        layers.setdefault(graph.nodes[node]["layer"], []).append(node)
    positions = {}
    for layer, nodes in layers.items():
        for rank, node in enumerate(nodes):
            # Alternate layers are shifted so that straight runs through a chain do not line up.
            positions[node] = (float(layer), 1.6 * (rank - (len(nodes) - 1) / 2) + (0.4 if layer % 2 else -0.4))
    return positions
