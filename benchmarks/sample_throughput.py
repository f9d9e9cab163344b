"""Sampling throughput: `rlhf sample` vs a plain `model.generate` loop, SmolLM2-135M, fp32, CPU.

    .venv/bin/python benchmarks/sample_throughput.py                          # full run (~3-4 min)
    .venv/bin/python benchmarks/sample_throughput.py --prompts 4 --batch-size 2 --max-new-tokens 8 --warmup 1   # smoke

Same work on both sides: the same model directory, the same Alpaca prompts rendered with the chat
template + generation prompt (by our code, once), the same batches, left padding, n, temperature,
top-p/top-k off, max_new_tokens, EOS, and the same per-batch seed that `rlhf sample` derives from
the prompt ids, so both sides draw the *same* tokens (checked: the per-batch new-token counts and
token ids must match). The ratio therefore measures what `rlhf sample` costs on top of
`model.generate` (prompt handling, cutting at EOS, decoding, JSONL output), nothing else.

New tokens = generated tokens up to and including EOS (padding after a finished row is not
counted). The first --warmup batches are dropped; tokens/s = new tokens / generate time over the
rest (min/median/max per batch too). Each side runs in its own process, one after the other, in
the project .venv (transformers is the same version in .bench-venv). Results:
benchmarks/results/sample_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, OURS_PY, RESULTS, cpu_info, load_alpaca, run_worker, summarize, versions, write_json  # noqa: E402
from prepare_model import DEFAULT_OUT as MODEL_DIR  # noqa: E402
from prepare_model import prepare  # noqa: E402


def build_plan(prompts_path: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    """Batches of rendered prompt ids + seeds, exactly as `rlhf_cli.commands.sample.run` makes them."""
    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.records import assign_ids, parse_prompt_row, render_prompt
    from rlhf_cli.generation import batch_seed
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    tok = load_tokenizer(parse_model_spec(str(model_dir)))
    rows = assign_ids([parse_prompt_row(line) for line in read_jsonl(str(prompts_path))])
    batches = []
    for b in range(0, len(rows), args.batch_size):
        batch = rows[b : b + args.batch_size]
        batches.append({"prompt_ids": [render_prompt(tok, r.prompt, r.messages, "chat") for r in batch],
                        "seed": batch_seed(0, [str(r.id) for r in batch])})
    return {"n": args.n, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "batches": batches}




def analyse(res: dict, warmup: int) -> dict:
    bs = res["batches"][warmup:]
    toks = [sum(b["new_tokens"]) for b in bs]
    secs = [b["seconds"] for b in bs]
    return {"new_tokens_per_s": sum(toks) / sum(secs), "per_batch_tokens_per_s": summarize([t / s for t, s in zip(toks, secs, strict=True)]),
            "batch_seconds": summarize(secs), "new_tokens": sum(toks), "peak_rss_mib": res["peak_rss_mib"],
            "wall_seconds_run": res["wall_seconds_run"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24, help="number of Alpaca prompts")
    ap.add_argument("--batch-size", type=int, default=8)
    # greedy by default: both sides must then produce the very same tokens, which the script checks,
    # so the ratio compares equal work (sampled runs consume their RNGs differently)
    ap.add_argument("--n", type=int, default=1, help="completions per prompt")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1, help="batches discarded at the start")
    ap.add_argument("--out", type=Path, default=RESULTS / "sample_throughput.json")
    args = ap.parse_args()
    if -(-args.prompts // args.batch_size) <= args.warmup:
        sys.exit("need more batches than --warmup: raise --prompts")

    model_dir = prepare(MODEL_DIR)
    results: dict = {"benchmark": "sample_throughput", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "model": str(model_dir.relative_to(HERE.parent)),
                     "env": {"cpu": cpu_info(), "versions": versions("torch", "transformers", "tokenizers", "rlhf-cli")},
                     "runs": []}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-sample-") as tmp_s:
        tmp = Path(tmp_s)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in load_alpaca(args.prompts)))
        plan = build_plan(prompts, model_dir, args)
        plan_path = tmp / "plan.json"
        plan_path.write_text(json.dumps(plan))
        sides = {
            "ours": [str(OURS_PY), str(HERE / "sample_worker_ours.py"), "--prompts", str(prompts), "--model", str(model_dir),
                     "--output", str(tmp / "samples.jsonl"), "--result", str(tmp / "ours.json"), "--n", str(args.n),
                     "--temperature", str(args.temperature), "--max-new-tokens", str(args.max_new_tokens),
                     "--batch-size", str(args.batch_size)],
            "hf-generate": [str(OURS_PY), str(HERE / "sample_worker_hf.py"), "--plan", str(plan_path),
                            "--model", str(model_dir), "--result", str(tmp / "hf-generate.json")],
        }
        for side, cmd in sides.items():
            load = os.getloadavg()[0]
            run_worker(cmd, RESULTS / f"sample_{side}.log")
            res = json.loads((tmp / f"{side}.json").read_text())
            res["loadavg_1min_before"] = load
            res["summary"] = analyse(res, args.warmup)
            results["runs"].append(res)
    ours, base = results["runs"]
    same = [a["token_ids"] == b["token_ids"] for a, b in zip(ours["batches"], base["batches"], strict=True)]
    for r in results["runs"]:  # the token ids only served the check; keep the JSON small
        for b in r["batches"]:
            del b["token_ids"]
    results["same_tokens_every_batch"] = all(same)
    results["ratio_new_tokens_per_s"] = ours["summary"]["new_tokens_per_s"] / base["summary"]["new_tokens_per_s"]
    write_json(args.out, results)

    cpu = results["env"]["cpu"]
    v = results["env"]["versions"]
    print(f"CPU: {cpu['model']} ({cpu['affinity']} usable CPUs)  flags: {' '.join(cpu['simd_flags'])}")
    print(f"torch {v['torch']}, transformers {v['transformers']}, rlhf-cli {v['rlhf-cli']}")
    print(f"SmolLM2-135M fp32: {args.prompts} prompts, batch {args.batch_size}, n {args.n}, temperature {args.temperature}, "
          f"max_new_tokens {args.max_new_tokens}, {args.warmup} warm-up batch(es) dropped\n")
    hdr = f"{'side':12s} {'new tok/s':>9s} {'per-batch median':>16s} {'min':>7s} {'max':>7s} {'new tokens':>10s} {'peak RSS MiB':>12s}"
    print(hdr)
    print("-" * len(hdr))
    for r in results["runs"]:
        s = r["summary"]
        pb = s["per_batch_tokens_per_s"]
        print(f"{r['side']:12s} {s['new_tokens_per_s']:9.1f} {pb['median']:16.1f} {pb['min']:7.1f} {pb['max']:7.1f} "
              f"{s['new_tokens']:10d} {s['peak_rss_mib']:12.0f}")
    print(f"\nours / plain generate: {results['ratio_new_tokens_per_s']:.3f}x   "
          f"same tokens in every batch: {results['same_tokens_every_batch']}")
    if not results["same_tokens_every_batch"]:
        print("  WARNING: the sides sampled different tokens, so they did different amounts of work")
    print(f"raw numbers: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
