"""Sampling from a trained MMAR model: masked-autoregressive image generation and captioning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtk.core.logging import get_logger
from mmtk.mmar.layout import IGNORE_INDEX, SequenceBatch, build_sequences
from mmtk.mmar.model import MMAR
from mmtk.mmar.tokens import mask_by_order, masked_counts, random_orders

log = get_logger(__name__)


@dataclass
class GenerationSettings:
    """Settings of text-to-image sampling.

    Attributes:
        num_iterations: masked-autoregressive iterations K_iter (1..N).
        num_sampling_steps: diffusion steps K per head call.
        cfg_scale: classifier-free guidance scale w (1 disables guidance).
        cfg_schedule: "linear" ramps the scale as 1 + (w - 1) * revealed / N;
            "constant" uses w at every iteration.
        temperature: multiplies the std of the noise injected by the sampler.
        eta: 1 for ancestral DDPM steps (MAR's choice), 0 for DDIM.
    """

    num_iterations: int = 16
    num_sampling_steps: int = 50
    cfg_scale: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    eta: float = 1.0


@torch.no_grad()
def generate_tokens(model: MMAR, captions: list[list[int]], bos_id: int, eos_id: int, settings: GenerationSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate image tokens (B, N, D) for caption ids (without BOS/EOS).

    Starts fully masked in a random order per image. Iteration k keeps
    ``masked_counts(N, K)[k]`` tokens masked and samples the newly revealed
    ones with the diffusion head, conditioned on the decoder's hidden states
    for the caption and the tokens revealed so far.
    """
    config = model.config
    device = model.diffusion_pos_embed.device
    batch = len(captions)
    n, d = config.num_image_tokens, config.token_dim
    guided = settings.cfg_scale != 1.0
    log.debug("generating %d images of %d tokens: %d iterations, %d steps, cfg %g", batch, n, settings.num_iterations, settings.num_sampling_steps, settings.cfg_scale)

    tasks = ["t2i"] * batch
    texts = list(captions)
    if guided:
        tasks += ["t2i"] * batch
        texts += [[] for _ in range(batch)]  # the unconditional prompt: BOS only
    sequences = build_sequences(tasks, texts, n, bos_id, eos_id).to(device)

    tokens = torch.zeros(batch, n, d, device=device)
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    orders = random_orders(batch, n, generator).to(device)
    for iteration, remaining in enumerate(masked_counts(n, settings.num_iterations)):
        both_tokens = torch.cat([tokens, tokens]) if guided else tokens
        both_mask = torch.cat([mask, mask]) if guided else mask
        hidden = model.hidden_states(sequences, both_tokens, both_mask)
        z = model.image_conditions(sequences, hidden)  # (B or 2B, N, H)

        next_mask = mask_by_order(torch.full((batch,), remaining, device=device), orders)
        reveal = mask & ~next_mask  # (B, N)
        z_cond = z[:batch][reveal]  # (R, H)
        z_uncond = z[batch:][reveal] if guided else None
        if settings.cfg_schedule == "linear":
            scale = 1.0 + (settings.cfg_scale - 1.0) * (n - remaining) / n
        else:
            scale = settings.cfg_scale
        sampled = model.diffusion.sample(
            z_cond.float(), z_uncond.float() if z_uncond is not None else None, cfg_scale=scale,
            num_sampling_steps=settings.num_sampling_steps, temperature=settings.temperature, eta=settings.eta, generator=generator,
        )  # (R, D)
        tokens = tokens.clone()
        tokens[reveal] = sampled.to(tokens.dtype)
        mask = next_mask
    return tokens


@torch.no_grad()
def predict_token_means(model: MMAR, z: torch.Tensor, z_uncond: torch.Tensor | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return the head's estimate of E[token | z] for conditions z (R, H): tokens (R, D).

    The estimate is x_0 predicted from pure noise at the last training
    timestep T - 1, where x_t carries almost no signal (alpha about 5e-5 for
    the cosine schedule with T = 1000). A head trained to convergence outputs
    the conditional mean there. With ``z_uncond`` and ``cfg_scale`` != 1 the
    output is guided as in sampling.
    """
    from mmtk.nn.diffusion import to_x0_eps

    head, process = model.diffusion.head, model.diffusion.diffusion
    count, dim = z.shape[0], head.token_dim
    x_t = torch.randn((count, dim), generator=generator, dtype=z.dtype).to(z.device)  # (R, D)
    t = torch.full((count,), process.num_steps - 1, dtype=torch.long, device=z.device)
    output = head(x_t, t, z)[:, :dim]  # the variance half, when the head has one, is not needed
    if z_uncond is not None and cfg_scale != 1.0:
        unconditional = head(x_t, t, z_uncond)[:, :dim]
        output = unconditional + cfg_scale * (output - unconditional)
    alpha, sigma = process.alpha_sigma(t, x_t)
    x0, _ = to_x0_eps(x_t, output, alpha, sigma, process.parameterisation)
    return x0  # (R, D)


@torch.no_grad()
def teacher_forced_completion_error(
    model: MMAR, captions: list[list[int]], tokens: torch.Tensor, bos_id: int, eos_id: int, settings: GenerationSettings,
    generator: torch.Generator | None = None, prediction: str = "sample",
) -> torch.Tensor:
    """Measure how well the model completes real images, iteration by iteration of the unmasking schedule.

    Each image starts fully masked in a random order, and iteration k
    reveals the tokens that :func:`generate_tokens` would reveal. The head
    predicts them conditioned on the caption and on the *true* tokens
    revealed in earlier iterations. The squared error between the
    predictions and the true tokens is recorded, and the true tokens, not
    the predictions, stay revealed (teacher forcing).
    A model that never saw low mask ratios in training shows a high error
    in the last iterations, where almost every token is already known.

    Args:
        model: a trained MMAR model (in eval mode).
        captions: (B,) caption ids without BOS/EOS; an empty list is the unconditional prompt.
        tokens: (B, N, D) true image tokens, scaled as in training.
        settings: sampling settings; ``num_iterations`` sets the schedule.
        prediction: "sample" draws each token with the diffusion sampler
            (guidance, temperature and eta from ``settings``), so the error
            includes the spread of the model's distribution. "mean" uses
            :func:`predict_token_means`, which has less noise.

    Returns:
        (K,) float tensor: the mean squared error per token value of the
        tokens sampled at each iteration, averaged over the batch.
    """
    config = model.config
    batch, n = tokens.shape[:2]
    if n != config.num_image_tokens or tokens.shape[2] != config.token_dim:
        raise ValueError(f"expected tokens of shape (B, {config.num_image_tokens}, {config.token_dim}), got {tuple(tokens.shape)}")
    if len(captions) != batch:
        raise ValueError(f"got {len(captions)} captions for {batch} images")
    if prediction not in ("sample", "mean"):
        raise ValueError(f"unknown prediction {prediction!r}; expected sample or mean")
    device = model.diffusion_pos_embed.device
    tokens = tokens.to(device)
    guided = settings.cfg_scale != 1.0

    tasks = ["t2i"] * batch
    texts = list(captions)
    if guided:
        tasks += ["t2i"] * batch
        texts += [[] for _ in range(batch)]
    sequences = build_sequences(tasks, texts, n, bos_id, eos_id).to(device)

    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    orders = random_orders(batch, n, generator).to(device)
    errors = []
    for remaining in masked_counts(n, settings.num_iterations):
        both_tokens = torch.cat([tokens, tokens]) if guided else tokens
        both_mask = torch.cat([mask, mask]) if guided else mask
        hidden = model.hidden_states(sequences, both_tokens, both_mask)
        z = model.image_conditions(sequences, hidden)  # (B or 2B, N, H)

        next_mask = mask_by_order(torch.full((batch,), remaining, device=device), orders)
        reveal = mask & ~next_mask  # (B, N)
        z_uncond = z[batch:][reveal].float() if guided else None
        if settings.cfg_schedule == "linear":
            scale = 1.0 + (settings.cfg_scale - 1.0) * (n - remaining) / n
        else:
            scale = settings.cfg_scale
        if prediction == "mean":
            predicted = predict_token_means(model, z[:batch][reveal].float(), z_uncond, scale, generator)  # (R, D)
        else:
            predicted = model.diffusion.sample(
                z[:batch][reveal].float(), z_uncond, cfg_scale=scale,
                num_sampling_steps=settings.num_sampling_steps, temperature=settings.temperature, eta=settings.eta, generator=generator,
            )  # (R, D)
        errors.append(((predicted - tokens[reveal].float()) ** 2).mean())
        mask = next_mask
    errors = torch.stack(errors)  # (K,)
    log.debug("teacher-forced completion of %d images (%s): error per iteration %s", batch, prediction, [round(e, 4) for e in errors.tolist()])
    return errors


@torch.no_grad()
def caption_tokens(model: MMAR, tokens: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int = 24, temperature: float = 0.0, generator: torch.Generator | None = None, prefixes: list[list[int]] | None = None) -> list[list[int]]:
    """Caption images from their clean tokens (B, N, D); returns the new caption ids without EOS.

    Greedy when ``temperature`` is 0. Each new token reruns the decoder on
    ``[BOI, image, EOI, prefix, caption so far]``, so the image span keeps
    its bidirectional attention. ``prefixes`` (one id list per image, for
    example a question) start the text and are not part of the result.
    """
    from mmtk.nn.llm import sample_next_token

    device = tokens.device
    batch, n = tokens.shape[:2]
    if prefixes is not None and len(prefixes) != batch:
        raise ValueError(f"got {len(prefixes)} prefixes for {batch} images")
    starts = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in range(batch)]
    captions: list[list[int]] = [list(p) for p in starts]
    finished = [False] * batch
    no_mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        sequences = build_sequences(["i2t"] * batch, captions, n, bos_id, eos_id)
        # The layout appends EOS; drop it so the last position is the newest caption token (or EOI).
        length = sequences.kinds.shape[1] - 1
        sequences = SequenceBatch(
            sequences.kinds[:, :length], sequences.text_ids[:, :length], sequences.image_start, torch.full((batch, length), IGNORE_INDEX), sequences.tasks,
        ).to(device)
        hidden = model.hidden_states(sequences, tokens, no_mask)
        logits = model.backbone.lm_head(hidden[:, -1]).float()  # (B, V)
        next_ids = sample_next_token(logits, temperature, 1.0, generator).tolist()
        for b, token in enumerate(next_ids):
            if finished[b]:
                continue
            if token == eos_id:
                finished[b] = True
            else:
                captions[b].append(int(token))
        if all(finished):
            break
    return [caption[len(start):] for caption, start in zip(captions, starts)]
