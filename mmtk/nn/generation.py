"""Prompt-to-text generation with a pretrained decoder, as ``mmtk generate-text`` runs it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mmtk.core.distributed import resolve_device
from mmtk.core.errors import InputError
from mmtk.core.logging import get_logger

log = get_logger(__name__)


def generate_text_summary(
    prompt: str,
    model_path: str | Path | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_chat_template: bool = True,
    seed: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint, continue ``prompt`` and return the text with timing and token counts.

    The chat template is applied when ``use_chat_template`` and the tokenizer
    has one; the prompt is then the user message.

    Returns:
        A mapping with keys model, source, device, chat_template, prompt,
        text, prompt_tokens, new_tokens, stopped (True when a stop token
        ended the text), load_seconds, generate_seconds and tokens_per_second.

    Raises:
        InputError: invalid settings, an empty prompt, a prompt plus
            ``max_new_tokens`` longer than the model's context length, or a
            checkpoint that cannot be loaded.
    """
    from mmtk.nn.loaders import load_pretrained

    if not 0.0 < top_p <= 1.0:
        raise InputError(f"--top-p must be in (0, 1], got {top_p}.")
    if temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {temperature}.")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    if not prompt:
        raise InputError("the prompt is empty; pass some text with --prompt.")
    torch_device = resolve_device(device)

    started = time.perf_counter()
    log.info("loading %s", model_path or "the bundled SmolLM2-135M-Instruct")
    loaded = load_pretrained(model_path, device=torch_device)
    load_seconds = time.perf_counter() - started
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise InputError(f"{loaded.source} has no tokenizer (tokenizer.json or GGUF tokenizer metadata); generate-text needs one.")

    chat = use_chat_template and bool(tokenizer.chat_template)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    prompt_ids = tokenizer.encode(text, add_special_tokens=not chat)
    if not prompt_ids:
        raise InputError("the prompt is empty after tokenization; pass some text with --prompt.")
    context_length = loaded.model.config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > context_length:
        raise InputError(
            f"the prompt has {len(prompt_ids)} tokens and --max-new-tokens is {max_new_tokens}, {len(prompt_ids) + max_new_tokens} in all, "
            f"but {loaded.source} has a context length (max_position_embeddings) of {context_length}; shorten the prompt or lower --max-new-tokens."
        )
    input_ids = torch.tensor([prompt_ids], device=torch_device)

    generator = None
    if temperature > 0:
        generator = torch.Generator(device=torch_device)
        generator.manual_seed(0 if seed is None else seed)

    stop_ids = loaded.stop_token_ids
    log.info("generating up to %d tokens after a %d-token prompt", max_new_tokens, len(prompt_ids))
    started = time.perf_counter()
    new_ids = loaded.model.generate(
        input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_token_ids=stop_ids, generator=generator
    )[0].tolist()
    generate_seconds = time.perf_counter() - started
    stopped = bool(new_ids) and new_ids[-1] in stop_ids
    log.info("generated %d tokens in %.2f s", len(new_ids), generate_seconds)

    return {
        "model": loaded.name,
        "source": str(loaded.source),
        "device": str(torch_device),
        "chat_template": chat,
        "prompt": prompt,
        "text": tokenizer.decode(new_ids, skip_special_tokens=True),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(new_ids),
        "stopped": stopped,
        "load_seconds": round(load_seconds, 3),
        "generate_seconds": round(generate_seconds, 3),
        "tokens_per_second": round(len(new_ids) / generate_seconds, 2) if generate_seconds > 0 else None,
    }
