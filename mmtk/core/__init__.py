"""Shared core: recipes, run folders, atomic I/O, HDF5 stores, logging, checkpoints."""
