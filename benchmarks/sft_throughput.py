"""SFT training throughput: `rlhf sft` vs TRL 1.16 `SFTTrainer` on SmolLM2-135M, fp32, CPU.

    .venv/bin/python benchmarks/sft_throughput.py                  # full run (~8-10 min on 2 cores)
    .venv/bin/python benchmarks/sft_throughput.py --steps 3 --warmup 1 --rows 200   # smoke test

Same work on both sides (BENCHMARKS.md):
  * one model directory (benchmarks/prepare_model.py), fp32, 2 threads, no gradient checkpointing;
  * one tokenization: the Alpaca rows go through *our* chat rendering + loss masks
    (rlhf_cli.data.sft_data.tokenize_rows) and *our* planner (plan_epoch: best-fit-decreasing
    packing, or one example per row); TRL is fed exactly those rows, in that order, pre-tokenized
    (input_ids + labels [+ seq_lengths]), so step i has the same tokens and loss mask on both sides;
  * packing on  -> ours: packed rows (B, <=max_len) with restarting position_ids;
                   TRL:  padding_free=True (its collator flattens the B rows into one sequence);
    packing off -> both: B examples right-padded with an attention mask;
  * each side in its own process (ours in .venv, TRL in .bench-venv), one after the other;
  * the first --warmup steps are dropped; min/median/max over the rest; non-padding tokens only.

A third run per packing mode, "trl-defaults", leaves TRL's gradient_checkpointing at its default
(True); the goal (>= 1.35x TRL, peak RSS no higher) is set against the matched "trl" run.
Raw numbers go to benchmarks/results/sft_throughput.json; worker logs to results/*.log.
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
from _common import (  # noqa: E402
    HERE,
    OURS_PY,
    PEER_PY,
    RESULTS,
    bench_env,
    cpu_info,
    load_alpaca,
    run_worker,
    summarize,
    versions,
    write_json,
)
from prepare_model import DEFAULT_OUT as MODEL_DIR  # noqa: E402
from prepare_model import prepare  # noqa: E402


def build_plan(data_path: Path, model_dir: Path, packing: bool, batch_size: int, max_len: int, steps: int) -> dict:
    """Our tokenization + our plan, exactly as `rlhf_cli.commands.sft.run` builds it (epoch 0, seed 0)."""
    from rlhf_cli.commands.sft import SftConfig, load_sources
    from rlhf_cli.config import build
    from rlhf_cli.data import sft_data
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    cfg = build(SftConfig, data=(str(data_path),), out="unused", model=str(model_dir), max_len=max_len,
                    packing=packing, batch_size=batch_size, max_steps=steps, seed=0)
    tok = load_tokenizer(parse_model_spec(cfg.model))
    raw_sources, _ = load_sources(cfg)
    sources = [sft_data.Source(sft_data.tokenize_rows(tok, rows, cfg.format, cfg.max_len), w) for _p, w, rows in raw_sources]
    mbs = sft_data.plan_epoch(sources, cfg.train.seed, 0, cfg.batch_size, cfg.max_len, cfg.packing)
    if len(mbs) < steps:
        sys.exit(f"only {len(mbs)} microbatches from the data, need {steps}: raise --rows")
    mbs = mbs[:steps]
    rows = []
    for mb in mbs:
        for row in mb:
            r = {"input_ids": [t for e in row for t in e.ids],
                 "labels": [t if m else -100 for e in row for t, m in zip(e.ids, e.mask, strict=True)]}
            if packing:
                r["seq_lengths"] = [len(e.ids) for e in row]
            rows.append(r)
    if any(len(mb) != batch_size for mb in mbs):
        sys.exit("a planned microbatch is short of --batch-size: raise --rows")
    return {"packing": packing, "batch_size": batch_size, "max_len": max_len, "steps": steps, "rows": rows,
            "step_tokens": [sft_data.token_count(mb) for mb in mbs],
            "step_targets": [sft_data.target_count(mb) for mb in mbs],
            "examples_per_step": [sum(len(r) for r in mb) for mb in mbs],
            "n_examples": sum(len(s.examples) for s in sources)}




def analyse(res: dict, plan: dict, warmup: int) -> dict:
    """Per-step tokens/s over the measured steps, and a check that the side did the planned work."""
    toks, secs = res["step_tokens"], res["step_seconds"]
    if toks != plan["step_tokens"]:
        sys.exit(f"{res['side']}: per-step token counts {toks} differ from the plan {plan['step_tokens']}")
    if "step_label_tokens" in res and res["step_label_tokens"] != plan["step_targets"]:
        sys.exit(f"{res['side']}: supervised tokens {res['step_label_tokens']} differ from the plan {plan['step_targets']}")
    m_toks, m_secs = toks[warmup:], secs[warmup:]
    out = {
        "tokens_per_s": summarize([t / s for t, s in zip(m_toks, m_secs, strict=True)]),
        "tokens_per_s_aggregate": sum(m_toks) / sum(m_secs),
        "step_seconds": summarize(m_secs),
        "peak_rss_mib_train": res["peak_rss_mib_train"],
        "peak_rss_mib_exit": res["peak_rss_mib_exit"],
        "loss_step1": res["losses"][0] if res.get("losses") else None,
    }
    if res.get("cycle_seconds"):
        cyc = res["cycle_seconds"][warmup:]
        out["tokens_per_s_cycle"] = summarize([t / s for t, s in zip(m_toks, cyc, strict=True)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="total optimizer steps per run (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2, help="steps discarded at the start")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=1000, help="Alpaca rows in the pool the planner packs from")
    ap.add_argument("--packing", default="on,off", help="comma list of on/off")
    ap.add_argument("--sides", default="ours,trl,trl-defaults", help="comma list of ours, trl, trl-defaults")
    ap.add_argument("--out", type=Path, default=RESULTS / "sft_throughput.json")
    args = ap.parse_args()
    if args.steps - args.warmup < 1:
        sys.exit("--steps must exceed --warmup")
    if not PEER_PY.exists() and any(s.startswith("trl") for s in args.sides.split(",")):
        sys.exit(f"{PEER_PY} missing: create .bench-venv (see benchmarks/README.md)")

    model_dir = prepare(MODEL_DIR)
    env_info = {"cpu": cpu_info(), "ours_versions": versions("torch", "transformers", "tokenizers", "rlhf-cli"),
                "threads": {k: v for k, v in bench_env().items() if k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")}}
    results: dict = {"benchmark": "sft_throughput", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "model": str(model_dir.relative_to(HERE.parent)), "env": env_info, "runs": []}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-sft-") as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "alpaca.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in load_alpaca(args.rows)))
        for mode in args.packing.split(","):
            packing = mode == "on"
            plan = build_plan(data, model_dir, packing, args.batch_size, args.max_len, args.steps)
            plan_path = tmp / f"plan-{mode}.json"
            plan_path.write_text(json.dumps(plan))
            print(f"packing {mode}: {plan['n_examples']} examples, per step tokens {plan['step_tokens']}, "
                  f"examples {plan['examples_per_step']}", file=sys.stderr)
            for side in args.sides.split(","):
                res_path = tmp / f"{side}-{mode}.json"
                log = RESULTS / f"sft_{side}_packing-{mode}.log"
                if side == "ours":
                    cmd = [str(OURS_PY), str(HERE / "sft_worker_ours.py"), "--data", str(data), "--model", str(model_dir),
                           "--work", str(tmp / f"work-{mode}"), "--result", str(res_path),
                           "--packing" if packing else "--no-packing", "--batch-size", str(args.batch_size),
                           "--max-len", str(args.max_len), "--steps", str(args.steps)]
                elif side in ("trl", "trl-defaults"):
                    cmd = [str(PEER_PY), str(HERE / "sft_worker_trl.py"), "--plan", str(plan_path),
                           "--model", str(model_dir), "--result", str(res_path)]
                    cmd += ["--trl-defaults"] if side == "trl-defaults" else []
                else:
                    sys.exit(f"unknown side {side!r}")
                load = os.getloadavg()[0]
                run_worker(cmd, log)
                res = json.loads(res_path.read_text())
                res["loadavg_1min_before"] = load
                res["summary"] = analyse(res, plan, args.warmup)
                res["packing"] = packing
                results["runs"].append(res)
                s = res["summary"]
                print(f"    {side:13s} packing {mode:3s}: median {s['tokens_per_s']['median']:7.1f} tok/s  "
                      f"peak RSS {s['peak_rss_mib_train']:.0f} MiB  (load {load:.1f})", file=sys.stderr)
    results["comparison"] = compare(results["runs"])
    write_json(args.out, results)
    print_table(results)
    print(f"\nraw numbers: {args.out}", file=sys.stderr)


def compare(runs: list[dict]) -> list[dict]:
    rows = []
    for packing in (True, False):
        by = {r["side"]: r["summary"] for r in runs if r["packing"] == packing}
        if "ours" not in by:
            continue
        for peer in ("trl", "trl-defaults"):
            if peer not in by:
                continue
            o, p = by["ours"], by[peer]
            ours_run = next(r for r in runs if r["packing"] == packing and r["side"] == "ours")
            peer_run = next(r for r in runs if r["packing"] == packing and r["side"] == peer)
            w = len(ours_run["step_seconds"]) - o["step_seconds"]["n"]
            # same microbatch on both sides at each step: the per-step time ratio is a paired measure
            paired = [ps / os_ for os_, ps in zip(ours_run["step_seconds"][w:], peer_run["step_seconds"][w:], strict=True)]
            rows.append({
                "ratio_paired_steps": summarize(paired),
                "loss_step1_abs_diff": abs(o["loss_step1"] - p["loss_step1"]) if p["loss_step1"] is not None else None,
                "packing": packing, "peer": peer,
                "ratio_median_tokens_per_s": o["tokens_per_s"]["median"] / p["tokens_per_s"]["median"],
                "ratio_aggregate_tokens_per_s": o["tokens_per_s_aggregate"] / p["tokens_per_s_aggregate"],
                "rss_ours_mib": o["peak_rss_mib_train"], "rss_peer_mib": p["peak_rss_mib_train"],
                "goal_met": (peer == "trl") and o["tokens_per_s"]["median"] >= 1.35 * p["tokens_per_s"]["median"]
                and o["peak_rss_mib_train"] <= p["peak_rss_mib_train"],
            })
    return rows


def print_table(results: dict) -> None:
    env = results["env"]
    peer_v = next((r["versions"] for r in results["runs"] if r["side"].startswith("trl")), {})
    print(f"CPU: {env['cpu']['model']}  ({env['cpu']['affinity']} usable CPUs)  flags: {' '.join(env['cpu']['simd_flags'])}")
    print(f"ours: torch {env['ours_versions']['torch']}, transformers {env['ours_versions']['transformers']}, "
          f"rlhf-cli {env['ours_versions']['rlhf-cli']}")
    if peer_v:
        print(f"peer: torch {peer_v['torch']}, transformers {peer_v['transformers']}, trl {peer_v['trl']}")
    st = results["settings"]
    print(f"SmolLM2-135M fp32, batch {st['batch_size']}, max_len {st['max_len']}, {st['steps'] - st['warmup']} "
          f"measured steps after {st['warmup']} warm-up\n")
    hdr = f"{'side':13s} {'packing':7s} {'grad ckpt':9s} {'tok/s median':>12s} {'min':>7s} {'max':>7s} {'aggregate':>9s} {'peak RSS MiB':>12s}"
    print(hdr)
    print("-" * len(hdr))
    for r in results["runs"]:
        s, c = r["summary"], r["config"]
        t = s["tokens_per_s"]
        print(f"{r['side']:13s} {'on' if r['packing'] else 'off':7s} {str(c['gradient_checkpointing']):9s} "
              f"{t['median']:12.1f} {t['min']:7.1f} {t['max']:7.1f} {s['tokens_per_s_aggregate']:9.1f} "
              f"{s['peak_rss_mib_train']:12.0f}")
    if results["comparison"]:
        print(f"\n{'packing':7s} {'vs':13s} {'ratio (median)':>14s} {'ratio (aggr.)':>13s} {'paired median':>13s} "
              f"{'RSS ours/peer MiB':>18s} {'|dloss| step 1':>14s}  goal")
        for c in results["comparison"]:
            goal = ("MET" if c["goal_met"] else "missed") if c["peer"] == "trl" else "-"
            dl = c["loss_step1_abs_diff"]
            print(f"{'on' if c['packing'] else 'off':7s} {c['peer']:13s} {c['ratio_median_tokens_per_s']:13.2f}x "
                  f"{c['ratio_aggregate_tokens_per_s']:12.2f}x {c['ratio_paired_steps']['median']:12.2f}x "
                  f"{c['rss_ours_mib']:8.0f}/{c['rss_peer_mib']:<9.0f} {dl if dl is None else f'{dl:.2e}':>14}  {goal}")
            if dl is not None and dl > 1e-3:
                print(f"  WARNING: step-1 losses differ by {dl:.3g}: the two sides may not be computing the same thing")
        print("goal (BENCHMARKS.md): >= 1.35x the matched TRL run, peak RSS no higher")


if __name__ == "__main__":
    main()
