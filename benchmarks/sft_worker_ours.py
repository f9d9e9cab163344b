"""One `rlhf sft` run in this process (project .venv), timed by the loop's own per-step clock.

Started by sft_throughput.py; not meant to be run by hand. Runs `rlhf_cli.commands.sft.run(cfg)`
(the real training loop, unmodified) and reads the per-step `tokens` / `tokens_per_s` it logs to
OUT/metrics.jsonl. That step time covers collate + forward + backward + clip + AdamW step (see
the loop in rlhf_cli/commands/sft.py). `tokens` there is the non-padding token count.

Peak RSS is read twice: just before the final checkpoint is written (the training peak, which is
what we compare: the peer saves nothing) and at exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, set_threads, versions, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True, help="scratch dir for the checkpoint")
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    set_threads()
    import torch

    from rlhf_cli.commands import sft
    from rlhf_cli.models import checkpoint

    rss_before_save: list[float] = []
    real_save = checkpoint.save_checkpoint

    def save_and_note(*a, **kw):  # run() looks the function up on the module at call time
        rss_before_save.append(peak_rss_mib())
        return real_save(*a, **kw)

    checkpoint.save_checkpoint = save_and_note
    out = Path(args.work) / "ckpt"
    from rlhf_cli.config import build

    cfg = build(
        sft.SftConfig, data=(args.data,), out=str(out), model=args.model, format="chat", max_len=args.max_len,
        packing=args.packing, batch_size=args.batch_size, grad_accum=1, lr=2e-5, schedule="cosine",
        max_steps=args.steps, save_every=0, seed=0, dtype="fp32", device="cpu",
        gradient_checkpointing=args.gradient_checkpointing,
    )
    t0 = time.perf_counter()
    sft.run(cfg)
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    write_json(args.result, {
        "side": "ours",
        "config": {"packing": args.packing, "batch_size": args.batch_size, "max_len": args.max_len,
                   "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing,
                   "optimizer": "torch.optim.AdamW (foreach on CPU)", "dtype": "fp32",
                   "torch_threads": torch.get_num_threads()},
        "step_tokens": [s["tokens"] for s in steps],
        "step_seconds": [s["tokens"] / s["tokens_per_s"] for s in steps],
        "losses": [s["loss"] for s in steps],
        "peak_rss_mib_train": rss_before_save[0] if rss_before_save else None,
        "peak_rss_mib_exit": peak_rss_mib(),
        "wall_seconds_run": wall,
        "versions": versions("torch", "transformers", "tokenizers", "accelerate", "rlhf-cli"),
    })


if __name__ == "__main__":
    main()
