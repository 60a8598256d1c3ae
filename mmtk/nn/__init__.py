"""Reusable neural-network blocks shared by the mmtk tools (decoder LM, vision encoders, ...).

Submodules are imported explicitly (``from mmtk.nn.llm import DecoderLM``) so
that importing this package stays cheap.
"""
