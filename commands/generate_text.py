"""``mmtk generate-text``: continue a prompt with a pretrained decoder, to check that a checkpoint loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mmtk_commands._common import DeviceOpt, JsonOpt, QuietOpt, SeedOpt, VerboseOpt, finish, run_options


def register(app: typer.Typer) -> None:
    @app.command("generate-text")
    def generate_text(
        prompt: Annotated[str, typer.Option("--prompt", help="Text to continue (a user message when the chat template is used).")],
        model: Annotated[Optional[Path], typer.Option("--model", help="Hugging Face model folder or .gguf file [default: bundled SmolLM2-135M-Instruct].")] = None,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Maximum number of tokens to generate.")] = 64,
        temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 means greedy decoding.")] = 0.0,
        top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold in (0, 1]; 1 disables it.")] = 1.0,
        raw: Annotated[bool, typer.Option("--raw", help="Continue the prompt as plain text instead of wrapping it in the chat template.")] = False,
        json: JsonOpt = False,
        seed: SeedOpt = None,
        device: DeviceOpt = None,
        verbose: VerboseOpt = 0,
        quiet: QuietOpt = False,
    ) -> None:
        """Load a decoder checkpoint and continue a prompt (greedy by default)."""
        from mmtk.core.runner import human_console, run_command

        options = run_options(None, json, seed, device, verbose, quiet)

        def body() -> dict:
            from mmtk.nn.generation import generate_text_summary

            summary = generate_text_summary(
                prompt=prompt, model_path=model, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, use_chat_template=not raw, seed=seed, device=device or "cpu",
            )
            if not json:
                human_console(options).print(summary["text"], markup=False, highlight=False)
            return summary

        finish(run_command(body, options))
