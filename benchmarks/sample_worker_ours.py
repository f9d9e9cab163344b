"""One `rlhf sample` run in this process (project .venv). Started by sample_throughput.py.

Runs `rlhf_cli.commands.sample.run(cfg)` unmodified. `sample.run` imports `generate` from
rlhf_cli.generation when it starts, so wrapping the module attribute before the call times each
batch's `generate()` (left padding, model.generate, cutting at EOS, decoding) without changing it.
The run's total wall time (model load, prompt rendering, JSONL writing included) is kept as well.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, set_threads, versions, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    set_threads()
    from rlhf_cli import generation
    from rlhf_cli.commands import sample

    batches: list[dict] = []
    real_generate = generation.generate

    def timed_generate(model, tok, prompts, params, device, seed, logprobs=False):
        t0 = time.perf_counter()
        out = real_generate(model, tok, prompts, params, device, seed, logprobs)
        dt = time.perf_counter() - t0
        batches.append({"seconds": dt, "seed": seed, "new_tokens": [len(c.token_ids) for comps in out for c in comps],
                        "token_ids": [c.token_ids for comps in out for c in comps]})
        return out

    generation.generate = timed_generate
    cfg = sample.SampleConfig(prompts=args.prompts, model=args.model, n=args.n, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=0,
                              output=args.output, device="cpu", dtype="fp32")
    t0 = time.perf_counter()
    sample.run(cfg)
    wall = time.perf_counter() - t0
    write_json(args.result, {
        "side": "ours", "batches": batches, "wall_seconds_run": wall, "peak_rss_mib": peak_rss_mib(),
        "versions": versions("torch", "transformers", "tokenizers", "rlhf-cli"),
    })


if __name__ == "__main__":
    main()
