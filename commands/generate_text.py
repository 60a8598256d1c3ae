"""``mmtk generate-text``: continue a prompt with a pretrained decoder, to check that a checkpoint loads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mmtk_commands._common import JsonOpt, QuietOpt, VerboseOpt, finish, run_options


def check_top_p(value: float) -> float:
    """Reject a --top-p outside (0, 1] with the same message as the other range checks."""
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not in the range 0<x<=1.")
    return value


def register(app: typer.Typer) -> None:
    @app.command("generate-text")
    def generate_text(
        prompt: Annotated[str, typer.Option("--prompt", help="Text to continue (a user message when the chat template is used); must not be empty.")],
        model: Annotated[Optional[Path], typer.Option("--model", help="Hugging Face model folder or .gguf file (default: the bundled SmolLM2-135M-Instruct).")] = None,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Maximum number of tokens to generate.")] = 64,
        temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 means greedy decoding.")] = 0.0,
        top_p: Annotated[float, typer.Option("--top-p", callback=check_top_p, help="Nucleus sampling threshold in the range 0<x<=1; 1 disables it.")] = 1.0,
        raw: Annotated[bool, typer.Option("--raw", help="Continue the prompt as plain text instead of wrapping it in the chat template.")] = False,
        json: JsonOpt = False,
        seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the sampling generator (default 0); greedy decoding ignores it.")] = None,
        device: Annotated[Optional[str], typer.Option("--device", help="Torch device such as cpu, cuda, cuda:1 or auto (default cpu).")] = None,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
    ) -> None:
        """Load a decoder checkpoint and continue a prompt (greedy by default)."""
        from mmtk.core.runner import run_command

        options = run_options(None, json, seed, device, verbose, quiet)

        def body() -> dict:
            from mmtk.nn.generation import generate_text_summary

            summary = generate_text_summary(
                prompt=prompt, model_path=model, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, use_chat_template=not raw, seed=seed, device=device or "cpu",
            )
            if not json:
                # Written as is: a rich console would wrap long lines at the terminal width.
                sys.stdout.write(summary["text"] + "\n")
                sys.stdout.flush()
            return summary

        finish(run_command(body, options))
