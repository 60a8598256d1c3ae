"""Bundled YAML recipes, one folder per tool (installed as ``mmtk_recipes``)."""
