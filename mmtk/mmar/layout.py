"""Sequence layout of MMAR samples and the hybrid attention mask.

Two sample kinds share one batch:

- text to image (``"t2i"``): ``[BOS, caption..., BOI, image x N, EOI]``;
- image to text (``"i2t"``): ``[BOI, image x N, EOI, caption..., EOS]``.

Sequences are left-padded to a common length. Because rotary position
embeddings depend only on relative offsets, the padding does not change
what the real positions compute. Attention is causal everywhere, except that
the N image positions of one image attend to each other in both directions
(or causally, with ``image_attention="causal"``). No query attends to padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, TEXT, IMAGE, BOI, EOI = 0, 1, 2, 3, 4
IGNORE_INDEX = -100


@dataclass
class SequenceBatch:
    """A left-padded batch of MMAR sequences.

    Attributes:
        kinds: (B, L) long, one of PAD, TEXT, IMAGE, BOI, EOI per position.
        text_ids: (B, L) long token ids at TEXT positions (0 elsewhere).
        image_start: (B,) long index of each sample's first image position.
        targets: (B, L) long next-token targets for the text loss
            (``IGNORE_INDEX`` where there is none): in image-to-text samples,
            the EOI position and every caption position but the last predict
            the next caption token or EOS.
        tasks: "t2i" or "i2t" per sample.
    """

    kinds: torch.Tensor
    text_ids: torch.Tensor
    image_start: torch.Tensor
    targets: torch.Tensor
    tasks: list[str]

    @property
    def num_image_tokens(self) -> int:
        return int((self.kinds[0] == IMAGE).sum())

    def to(self, device: torch.device | str) -> "SequenceBatch":
        """Return a copy with every tensor on ``device``."""
        return SequenceBatch(self.kinds.to(device), self.text_ids.to(device), self.image_start.to(device), self.targets.to(device), list(self.tasks))

    def image_positions(self) -> torch.Tensor:
        """Return (B, N) indices of the image positions, in token order."""
        n = self.num_image_tokens
        return self.image_start[:, None] + torch.arange(n, device=self.kinds.device)[None]


def build_sequences(tasks: list[str], captions: list[list[int]], num_image_tokens: int, bos_id: int, eos_id: int) -> SequenceBatch:
    """Lay out one sequence per sample; ``captions`` are token ids without BOS or EOS.

    A text-to-image caption may be empty (the unconditional prompt).
    """
    if len(tasks) != len(captions):
        raise ValueError(f"got {len(tasks)} tasks but {len(captions)} captions")
    rows: list[tuple[list[int], list[int], list[int], int]] = []
    for task, caption in zip(tasks, captions):
        n = num_image_tokens
        if task == "t2i":
            text = [bos_id] + list(caption)
            kinds = [TEXT] * len(text) + [BOI] + [IMAGE] * n + [EOI]
            ids = text + [0] * (n + 2)
            targets = [IGNORE_INDEX] * len(kinds)
            image_start = len(text) + 1
        elif task == "i2t":
            text = list(caption) + [eos_id]
            kinds = [BOI] + [IMAGE] * n + [EOI] + [TEXT] * len(text)
            ids = [0] * (n + 2) + text
            # Position i predicts the token at i + 1: EOI predicts the first caption token.
            targets = [IGNORE_INDEX] * (n + 1) + text + [IGNORE_INDEX]
            image_start = 1
        else:
            raise ValueError(f"unknown task {task!r}; expected t2i or i2t")
        rows.append((kinds, ids, targets, image_start))

    length = max(len(r[0]) for r in rows)
    batch = len(rows)
    kinds_t = torch.full((batch, length), PAD, dtype=torch.long)
    ids_t = torch.zeros((batch, length), dtype=torch.long)
    targets_t = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    starts = torch.zeros(batch, dtype=torch.long)
    for b, (kinds, ids, targets, image_start) in enumerate(rows):
        pad = length - len(kinds)
        kinds_t[b, pad:] = torch.tensor(kinds)
        ids_t[b, pad:] = torch.tensor(ids)
        targets_t[b, pad:] = torch.tensor(targets)
        starts[b] = pad + image_start
    return SequenceBatch(kinds=kinds_t, text_ids=ids_t, image_start=starts, targets=targets_t, tasks=list(tasks))


def hybrid_attention_mask(kinds: torch.Tensor, image_attention: str = "bidirectional") -> torch.Tensor:
    """Return the (B, L, L) boolean attention mask, True where query i may attend to key j.

    Causal over all real positions; with ``"bidirectional"`` every image
    position also attends to every position of its own image span. Padding
    keys are blocked, and a padding query attends only to itself so that
    no row is empty.
    """
    if image_attention not in ("bidirectional", "causal"):
        raise ValueError(f"unknown image_attention {image_attention!r}; expected bidirectional or causal")
    batch, length = kinds.shape
    real = kinds != PAD  # (B, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=kinds.device).tril()
    allowed = causal[None] & real[:, None, :] & real[:, :, None]  # (B, L, L)

    if image_attention == "bidirectional":
        # Span id: the number of BOI markers up to each position, kept only at image positions.
        span = torch.cumsum((kinds == BOI).long(), dim=1)
        span = torch.where(kinds == IMAGE, span, torch.full_like(span, -1))
        same_image = (span[:, :, None] == span[:, None, :]) & (span[:, :, None] >= 0)
        allowed = allowed | same_image

    eye = torch.eye(length, dtype=torch.bool, device=kinds.device)[None]
    return allowed | (eye & ~real[:, :, None])
