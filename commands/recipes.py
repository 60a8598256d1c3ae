"""``mmtk recipes``: list the bundled recipes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("recipes")
    def recipes(
        tool: Annotated[Optional[str], typer.Argument(help="Only list this tool's recipes.")] = None,
        json: Annotated[bool, typer.Option("--json", help="Print the listing as JSON.")] = False,
    ) -> None:
        """List the bundled recipes, by tool."""
        from rich.console import Console
        from rich.table import Table

        from mmtk.core.io import to_json
        from mmtk.core.recipe import bundled_recipes_root, list_bundled_recipes

        listing = list_bundled_recipes()
        if tool is not None:
            if tool not in listing:
                typer.echo(f"error: no bundled recipes for tool '{tool}'. Tools with recipes: {', '.join(listing)}.", err=True)
                raise typer.Exit(2)
            listing = {tool: listing[tool]}

        if json:
            typer.echo(to_json({"root": str(bundled_recipes_root()), "recipes": listing}))
            return
        table = Table("tool", "recipe", "file")
        root = bundled_recipes_root()
        for tool_name, names in listing.items():
            for name in names:
                table.add_row(tool_name, name, str(root / tool_name / f"{name}.yaml"))
        Console().print(table)
