"""Benchmark SmolLM2-135M on CPU: mmtk's decoder against transformers, each in its own subprocess.

Measures, for each side with the same ``torch.set_num_threads``:
  * load time of the converted safetensors folder (the mmtk cache of the bundled model),
  * prefill throughput: one forward pass over a 512-token prompt that fills
    the KV cache and computes the last position's logits (tokens/s),
  * decode throughput: 128 greedy steps of one token each with the KV cache (tokens/s),
  * peak resident memory of the process (``ru_maxrss``, MiB).

Each timed step runs ``--repeats`` times and the fastest run counts. Usage::

    .venv/bin/python benchmarks/llm_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

PROMPT_TOKENS = 512
NEW_TOKENS = 128


def prompt_ids(tokenizer_encode, length: int) -> list[int]:
    """Return exactly ``length`` ids of real English text (repeated as needed)."""
    text = (
        "The history of astronomy spans thousands of years, from the first careful records of the night sky "
        "to modern telescopes that observe galaxies billions of light years away. Early observers tracked the "
        "motions of the Sun, the Moon and the planets to keep calendars and to navigate at sea. "
    )
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer_encode(text)
    return ids[:length]


def run_side(side: str, threads: int, repeats: int) -> dict:
    """Measure one side in this process; returns the numbers as a mapping."""
    import torch

    torch.set_num_threads(threads)
    from mmtk.nn.loaders import smollm2_directory
    from mmtk.nn.tokenizer import Tokenizer

    folder = smollm2_directory()
    tokenizer = Tokenizer.from_directory(folder)
    ids = torch.tensor([prompt_ids(tokenizer.encode, PROMPT_TOKENS)])

    started = time.perf_counter()
    if side == "mmtk":
        from mmtk.nn.loaders import load_hf_directory

        model, _ = load_hf_directory(folder)

        def prefill():
            out = model(ids, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], out.past_key_values

        def step(token, cache):
            out = model(token, past_key_values=cache, use_cache=True)
            return out.logits[:, -1], cache
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        def prefill():
            out = model(ids, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], out.past_key_values

        def step(token, cache):
            out = model(token, past_key_values=cache, use_cache=True)
            return out.logits[:, -1], out.past_key_values
    load_seconds = time.perf_counter() - started

    prefill_times, decode_times, generated = [], [], None
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            logits, cache = prefill()
            prefill_times.append(time.perf_counter() - started)

            tokens = []
            started = time.perf_counter()
            for _ in range(NEW_TOKENS):
                token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
                tokens.append(int(token))
                logits, cache = step(token, cache)
            decode_times.append(time.perf_counter() - started)
            generated = tokens

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "side": side,
        "threads": threads,
        "load_seconds": round(load_seconds, 3),
        "prefill_tokens_per_second": round(PROMPT_TOKENS / min(prefill_times), 1),
        "decode_tokens_per_second": round(NEW_TOKENS / min(decode_times), 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "generated_ids": generated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides (default 1).")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step; the fastest counts (default 3).")
    parser.add_argument("--side", choices=["mmtk", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        print(json.dumps(run_side(args.side, args.threads, args.repeats)))
        return

    # Convert the bundled model once, outside the timed subprocesses.
    from mmtk.nn.loaders import smollm2_directory

    smollm2_directory()
    results = {}
    for side in ("transformers", "mmtk"):
        command = [sys.executable, __file__, "--side", side, "--threads", str(args.threads), "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(output.strip().splitlines()[-1])

    baseline, ours = results["transformers"], results["mmtk"]
    rows = [
        ("prefill tokens/s (512)", "prefill_tokens_per_second", True),
        ("decode tokens/s (128, KV cache)", "decode_tokens_per_second", True),
        ("peak RSS MiB", "peak_rss_mib", False),
        ("load s", "load_seconds", False),
    ]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.platform()}, python {platform.python_version()}")
    print(f"threads: {args.threads}, repeats: {args.repeats} (fastest counts)")
    print(f"| metric | transformers | mmtk | mmtk / transformers |")
    print("|---|---:|---:|---:|")
    for label, key, _ in rows:
        print(f"| {label} | {baseline[key]} | {ours[key]} | {ours[key] / baseline[key]:.2f} |")
    same = baseline["generated_ids"] == ours["generated_ids"]
    print(f"greedy tokens identical over {NEW_TOKENS} steps: {same}")


if __name__ == "__main__":
    main()
