"""mmtk: command-line research tools for ten multimodal and scientific ML methods."""

__version__ = "0.1.0"
