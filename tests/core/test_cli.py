"""The mmtk entry point: version, help and the recipe listing."""

from __future__ import annotations

import json
import subprocess
import sys

import mmtk


def test_version_flag(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mmtk {mmtk.__version__}"


def test_recipes_json_lists_tool_folders(cli):
    from mmtk.core.recipe import list_bundled_recipes

    result = cli("recipes", "--json")
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    assert listing["recipes"] == list_bundled_recipes()


def test_recipes_unknown_tool_exits_2(cli):
    result = cli("recipes", "no-such-tool")
    assert result.exit_code == 2
    assert "no bundled recipes for tool 'no-such-tool'" in result.output


def test_console_script_runs_out_of_process():
    result = subprocess.run([sys.executable, "-m", "mmtk_commands.main", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"mmtk {mmtk.__version__}"


def test_usage_error_prints_json_object():
    command = [sys.executable, "-m", "mmtk_commands.main", "mmar-caption", "default", "--json", "--resume"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert json.loads(result.stdout) == {"error": "No such option: --resume", "error_type": "NoSuchOption", "exit_code": 2}
    assert "No such option: --resume" in result.stderr


def test_json_success_exits_0_with_summary():
    command = [sys.executable, "-m", "mmtk_commands.main", "recipes", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0
    assert "train-mmar" in json.loads(result.stdout)["recipes"]
