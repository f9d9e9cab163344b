"""One rank of a 2-process `rlhf sft` run under torchrun, DDP (`--shard none`) or FSDP2 (`--shard full`).

Started by fsdp_sft.py through `torch.distributed.run`; not meant to be run by hand. Runs the real
loop (`rlhf_cli.commands.sft.run`), reads its per-step clock from OUT/metrics.jsonl (rank 0 writes it)
and writes this rank's peak RSS: just before the final checkpoint (the training peak; FSDP then
gathers the whole model onto rank 0 to save it) and at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, versions, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True, type=Path, help="RANK is appended")
    ap.add_argument("--shard", choices=("none", "full"), required=True)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=7)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from rlhf_cli.commands import sft
    from rlhf_cli.config import build
    from rlhf_cli.models import checkpoint

    rss_before_save: list[float] = []
    rss_now: list[float] = []  # VmRSS after the last step: the training state held, without load-time peaks
    real_save = checkpoint.save_checkpoint

    def current_rss_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def save_and_note(*a, **kw):
        rss_now.append(current_rss_mib())
        rss_before_save.append(peak_rss_mib())
        return real_save(*a, **kw)

    checkpoint.save_checkpoint = save_and_note
    import rlhf_cli.sharding as sharding

    real_gather = sharding.full_state_dict

    def gather_and_note(model):  # the training peak, before the final gather for saving
        rss_now.append(current_rss_mib())
        rss_before_save.append(peak_rss_mib())
        return real_gather(model)

    sharding.full_state_dict = gather_and_note
    rank = int(os.environ["RANK"])
    cfg = build(sft.SftConfig, data=(args.data,), out=args.out, model=args.model, format="chat", max_len=args.max_len,
                packing=True, batch_size=args.batch_size, grad_accum=1, lr=2e-5, schedule="cosine", max_steps=args.steps,
                save_every=0, seed=0, dtype="fp32", device="cpu", shard=args.shard)
    sft.run(cfg)
    steps = []
    if rank == 0:
        steps = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    write_json(args.result.with_name(f"{args.result.stem}-rank{rank}.json"), {
        "rank": rank, "shard": args.shard, "threads": torch.get_num_threads(),
        "step_seconds": [s["tokens"] / s["tokens_per_s"] for s in steps], "step_tokens": [s["tokens"] for s in steps],
        "losses": [s["loss"] for s in steps],
        # a DDP rank other than 0 saves nothing: its peak at exit is its training peak
        "peak_rss_mib_train": rss_before_save[0] if rss_before_save else peak_rss_mib(), "peak_rss_mib_exit": peak_rss_mib(),
        "rss_mib_after_training": rss_now[0] if rss_now else current_rss_mib(),
        "versions": versions("torch", "transformers"),
    })


if __name__ == "__main__":
    main()
