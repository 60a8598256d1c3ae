"""Package layout that pyproject.toml cannot express on its own.

The top-level folders ``commands/`` and ``recipes/`` are installed as
``mmtk_commands`` and ``mmtk_recipes`` so that they cannot clash with other
distributions' packages.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mmtk", "mmtk.*"]) + ["mmtk_commands", "mmtk_recipes"],
    package_dir={"mmtk_commands": "commands", "mmtk_recipes": "recipes"},
    package_data={"mmtk_recipes": ["*/*.yaml"], "mmtk": ["**/*.yaml", "**/*.json"]},
    include_package_data=False,
)
