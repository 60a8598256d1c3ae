"""``mmtk discover-reactions`` and ``mmtk simulate-reactions``: PPF mechanism discovery."""

from __future__ import annotations

import typer

from mmtk_commands._common import DeviceOpt, JsonOpt, OutOpt, OverridesArg, QuietOpt, RecipeArg, ResumeOpt, SeedOpt, VerboseOpt, finish, run_options


def register(app: typer.Typer) -> None:
    @app.command("discover-reactions")
    def discover_reactions(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        out: OutOpt = None,
        json: JsonOpt = False,
        seed: SeedOpt = None,
        device: DeviceOpt = None,
        resume: ResumeOpt = False,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
    ) -> None:
        """Discover a mass-action reaction mechanism from (c, dc/dt) data with PPF.

        Prints the mechanism in canonical order and, when a true mechanism is
        known, the comparison; writes mechanism.yaml and loss.png. Bundled
        recipes: hydrogen-oxidation, michaelis-menten, linear-chain, ...
        """
        from mmtk.core.runner import run_tool
        from mmtk.reactions.recipe import DiscoverRecipe
        from mmtk.reactions.tool import run_discover

        options = run_options(out, json, seed, device, verbose, quiet, resume)
        finish(run_tool("discover-reactions", DiscoverRecipe, recipe, overrides or [], options, run_discover))

    @app.command("simulate-reactions")
    def simulate_reactions(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        out: OutOpt = None,
        json: JsonOpt = False,
        seed: SeedOpt = None,
        device: DeviceOpt = None,
        resume: ResumeOpt = False,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
    ) -> None:
        """Simulate a mass-action mechanism and write trajectories with exact dc/dt (HDF5).

        Runs on the CPU only (--device accepts cpu). --resume reuses a finished
        run made with the same recipe and simulates again otherwise.
        """
        from mmtk.core.runner import run_tool
        from mmtk.reactions.recipe import SimulateRecipe
        from mmtk.reactions.tool import run_simulate

        options = run_options(out, json, seed, device, verbose, quiet, resume)
        finish(run_tool("simulate-reactions", SimulateRecipe, recipe, overrides or [], options, run_simulate))
