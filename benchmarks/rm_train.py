"""Reward-model training on HH-RLHF: `rlhf train-rm` vs TRL 1.16 `RewardTrainer`, SmolLM2-135M, fp32, CPU.

    .venv/bin/python benchmarks/rm_train.py                              # full run (~30-40 min on 2 cores)
    .venv/bin/python benchmarks/rm_train.py --steps 4 --trl-steps 3 --warmup 1 --eval 8   # smoke test
    .venv/bin/python benchmarks/rm_train.py --throughput-only --sides ours,trl,ours \
        --out benchmarks/results/rm_train_throughput.json                # throughput alone (~10 min)

What it measures
  * held-out accuracy of our reward model after a fixed budget (--steps x --batch-size pairs) on the
    Anthropic HH-RLHF helpful-base *test* split (the only split in ../shared/data), shuffled with
    seed 0 and cut into --eval held-out pairs and a training part;
  * train throughput (pairs/s and non-padding tokens/s per optimizer step) against TRL's
    RewardTrainer on the same first --trl-steps batches.

Same work on both sides (/work/shared/BENCHMARKS.md):
  * one starting checkpoint: SmolLM2-135M (benchmarks/prepare_model.py) turned into a
    sequence-classification model with *our* head init and a pad token distinct from EOS, saved to a
    temp dir; both sides load it, so the step-1 losses must agree (checked below);
  * one tokenization: our pref_data (HH transcript -> prompt + completion + EOS, prompt cut from the
    left at --max-len) and our data plan (seeded shuffle); TRL gets exactly those `chosen_ids` /
    `rejected_ids` rows in plan order with sequential sampling, so step i is the same batch;
  * fp32 (bf16=False explicitly), no gradient checkpointing (TRL's default is on), AdamW, lr
    schedule, warmup and grad clipping alike, 2 threads, no dataloader workers, logging/saving off;
  * each side in its own process (ours in .venv, TRL in .bench-venv), one after the other; the
    first --warmup steps are dropped; min/median/max over the rest; the machine's load average is
    recorded before each side (other people share these CPUs).
Raw numbers go to benchmarks/results/rm_train.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
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
    cpu_info,
    peak_rss_mib,
    run_worker,
    set_threads,
    summarize,
    versions,
    write_json,
)

HH = Path(os.environ.get("RLHF_BENCH_HH", "/work/shared/data/hh_rlhf/helpful-base/test.jsonl.gz"))
KNOBS = {"lr": 1e-5, "schedule": "linear", "warmup_frac": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0}


# ---------------------------------------------------------------- driver (project .venv)


def load_hh(n_eval: int, n_train: int) -> tuple[list[dict], list[dict]]:
    if not HH.is_file():
        sys.exit(f"benchmark data missing: {HH}\n  set RLHF_BENCH_HH=/path/to/hh-rlhf/test.jsonl.gz")
    with gzip.open(HH, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows if r["chosen"] != r["rejected"]]
    random.Random(0).shuffle(rows)
    if n_eval + n_train > len(rows):
        sys.exit(f"only {len(rows)} HH pairs: lower --eval or --steps x --batch-size")
    return rows[n_eval : n_eval + n_train], rows[:n_eval]


def build_init(model_dir: Path, out: Path) -> None:
    """SmolLM2 -> sequence classification with our head init and a distinct pad; saved as an HF dir."""
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec
    from rlhf_cli.models.reward import load_reward_model

    spec = parse_model_spec(str(model_dir))
    tok = load_tokenizer(spec)
    model = load_reward_model(spec, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_plan(cfg_kw: dict, steps: int) -> dict:
    """Our tokenization + our plan, exactly as `rlhf_cli.commands.train_rm.run` builds them."""
    from rlhf_cli import training
    from rlhf_cli.commands.train_rm import RmConfig, load_rows
    from rlhf_cli.config import build
    from rlhf_cli.data import pref_data
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    cfg = build(RmConfig, **cfg_kw)
    tok = load_tokenizer(parse_model_spec(cfg.model))
    rows, _ = load_rows(cfg)
    train, _ = pref_data.split_examples(pref_data.tokenize_prefs(tok, rows, cfg.format, cfg.max_len), [], cfg.eval_split, cfg.train.seed)
    plan = training.plan_epochs(lambda e: pref_data.epoch_batches(train, cfg.train.seed, e, cfg.batch_size), cfg.train, 1)
    mbs = plan.mbs[:steps]
    return {"batch_size": cfg.batch_size, "max_len": cfg.max_len, "steps": steps, "pad_id": tok.pad_token_id,
            "rows": [{"chosen_ids": ex.seqs[0], "rejected_ids": ex.seqs[1]} for mb in mbs for ex in mb],
            "step_tokens": [pref_data.token_count(mb) for mb in mbs], "knobs": KNOBS, "total_steps": cfg.train.max_steps}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="our training budget in optimizer steps")
    ap.add_argument("--trl-steps", type=int, default=10, help="steps TRL runs for the throughput comparison")
    ap.add_argument("--warmup", type=int, default=2, help="steps discarded from the throughput numbers")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--eval", type=int, default=200, help="held-out pairs")
    ap.add_argument("--sides", default="ours,trl", help="comma list run in order; a repeated side is stored as SIDE-2")
    ap.add_argument("--throughput-only", action="store_true",
                    help="both sides run --trl-steps steps at a constant lr (identical losses expected); no held-out eval")
    ap.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "rm_train.json")
    args = ap.parse_args()
    if args.worker == "ours":
        return worker_ours(args.cfg, args.result)
    if args.worker == "trl":
        return worker_trl(args.plan, args.result)
    if min(args.steps, args.trl_steps) <= args.warmup:
        sys.exit("--steps and --trl-steps must exceed --warmup")
    sides = args.sides.split(",")
    if "trl" in sides and not PEER_PY.exists():
        sys.exit(f"{PEER_PY} missing: create .bench-venv with trl==1.16.0")

    from prepare_model import DEFAULT_OUT, prepare

    model_dir = prepare(DEFAULT_OUT)
    if args.throughput_only:
        # constant lr, no warmup: transformers' warmup starts at lr 0, ours at peak/warmup, so only a
        # constant schedule gives both sides the same update at every step
        args.steps, args.eval = args.trl_steps, 0
        KNOBS.update(schedule="constant", warmup_frac=0.0)
    train_rows, held_out = load_hh(args.eval, args.steps * args.batch_size)  # one epoch of pairs (less the unfit ones)
    results: dict = {"benchmark": "rm_train", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                  if k not in ("worker", "plan", "cfg", "result")},
                     "data": str(HH), "model": str(model_dir.relative_to(HERE.parent)), "knobs": KNOBS,
                     "env": {"cpu": cpu_info(), "ours_versions": versions("torch", "transformers", "tokenizers", "rlhf-cli")},
                     "runs": {}}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-rm-") as tmp_s:
        tmp = Path(tmp_s)
        for name, rows in (("train", train_rows), ("held_out", held_out)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        build_init(model_dir, tmp / "init")
        cfg_kw = dict(data=str(tmp / "train.jsonl"), out=str(tmp / "rm"), model=str(tmp / "init"), format="raw",
                      max_len=args.max_len, batch_size=args.batch_size, max_steps=args.steps, lr=KNOBS["lr"],
                      schedule=KNOBS["schedule"], warmup=KNOBS["warmup_frac"],
                      eval_data=str(tmp / "held_out.jsonl") if held_out else None,
                      save_every=0, seed=KNOBS["seed"], device="cpu", dtype="fp32")
        (tmp / "cfg.json").write_text(json.dumps(cfg_kw))
        plan = build_plan(cfg_kw, args.trl_steps)
        (tmp / "plan.json").write_text(json.dumps(plan))
        print(f"{len(train_rows)} training pairs, {len(held_out)} held out; TRL plan: tokens per step {plan['step_tokens']}",
              file=sys.stderr)
        for side in sides:
            res_path = tmp / f"{side}.json"
            if side == "ours":
                cmd = [str(OURS_PY), __file__, "--worker", "ours", "--cfg", str(tmp / "cfg.json"), "--result", str(res_path)]
            else:
                cmd = [str(PEER_PY), __file__, "--worker", "trl", "--plan", str(tmp / "plan.json"), "--result", str(res_path)]
            load = run_worker(cmd, RESULTS / f"rm_train_{side}.log")
            res = json.loads(res_path.read_text())
            res["loadavg_1min_before"] = load
            results["runs"][side if side not in results["runs"] else f"{side}-2"] = res
    results["step_tokens"] = plan["step_tokens"]
    results["comparison"] = compare(results["runs"], plan["step_tokens"], args.warmup)
    write_json(args.out, results)
    report(results)
    print(f"\nraw numbers: {args.out}", file=sys.stderr)


def compare(runs: dict, step_tokens: list[int], warmup: int) -> dict:
    out: dict = {}
    n = len(step_tokens)
    for side, r in runs.items():
        secs = r["step_seconds"][:n]
        out[side] = {"pairs_per_s": summarize([r["pairs_per_step"] / s for s in secs[warmup:]]),
                     "tokens_per_s": summarize([t / s for t, s in zip(step_tokens[warmup:], secs[warmup:], strict=False)]),
                     "step_seconds": summarize(secs[warmup:]), "peak_rss_mib": r["peak_rss_mib_train"]}
    if "ours" in runs and "trl" in runs:
        o, t = runs["ours"]["step_seconds"][:n], runs["trl"]["step_seconds"][:n]
        out["ratio_paired_steps"] = summarize([ts / os_ for os_, ts in zip(o[warmup:], t[warmup:], strict=True)])
        out["ratio_median_pairs_per_s"] = out["ours"]["pairs_per_s"]["median"] / out["trl"]["pairs_per_s"]["median"]
        out["loss_step1_abs_diff"] = abs(runs["ours"]["losses"][0] - runs["trl"]["losses"][0])
        # with repeats (--sides ours,trl,ours,trl) the best run of each side: other people's jobs only slow a run down
        best = {side: max(v["pairs_per_s"]["median"] for k, v in out.items() if k.split("-")[0] == side) for side in ("ours", "trl")}
        out["ratio_best_run_median_pairs_per_s"] = best["ours"] / best["trl"]
        out["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(runs["ours"]["losses"][:n], runs["trl"]["losses"][:n], strict=True))
    return out


def report(results: dict) -> None:
    env, c = results["env"], results["comparison"]
    print(f"CPU: {env['cpu']['model']} ({env['cpu']['affinity']} usable CPUs), load at start {env['cpu']['loadavg_at_start']}")
    st = results["settings"]
    print(f"SmolLM2-135M reward model, fp32, batch {st['batch_size']} pairs, max_len {st['max_len']}, HH-RLHF helpful-base")
    if results["runs"].get("ours", {}).get("eval_accuracy") is not None:
        o = results["runs"]["ours"]
        print(f"ours: held-out accuracy {o['eval_accuracy']:.3f} on {st['eval']} pairs after {st['steps']} steps "
              f"({st['steps'] * st['batch_size']} pairs), train {o['wall_seconds_run']:.0f} s wall")
    for side in c:
        if isinstance(c[side], dict) and "pairs_per_s" in c[side]:
            s = c[side]
            print(f"{side:5s} pairs/s median {s['pairs_per_s']['median']:.3f} (min {s['pairs_per_s']['min']:.3f}, max "
                  f"{s['pairs_per_s']['max']:.3f})  tokens/s {s['tokens_per_s']['median']:.1f}  peak RSS {s['peak_rss_mib']:.0f} MiB")
    if "ratio_paired_steps" in c:
        print(f"ours / TRL: {c['ratio_median_pairs_per_s']:.2f}x (median pairs/s), paired per-step median "
              f"{c['ratio_paired_steps']['median']:.2f}x; |loss difference| step 1 {c['loss_step1_abs_diff']:.2e}, "
              f"max over the steps {c['loss_max_abs_diff']:.2e}")
        print(f"best run of each side: ours / TRL {c['ratio_best_run_median_pairs_per_s']:.2f}x (median pairs/s)")
    for side, r in results["runs"].items():
        print(f"  {side}: load average before {r['loadavg_1min_before']:.1f}")


# ---------------------------------------------------------------- workers


def worker_ours(cfg_path: Path, result: Path) -> None:
    """`rlhf_cli.commands.train_rm.run` unmodified; step times from the loop's own clock (metrics.jsonl)."""
    set_threads()
    from rlhf_cli.commands import train_rm
    from rlhf_cli.models import checkpoint

    rss: list[float] = []
    real_save = checkpoint.save_checkpoint

    def save_and_note(*a, **kw):
        rss.append(peak_rss_mib())
        return real_save(*a, **kw)

    checkpoint.save_checkpoint = save_and_note
    from rlhf_cli.config import build

    cfg = build(train_rm.RmConfig, **json.loads(cfg_path.read_text()))
    t0 = time.perf_counter()
    final = train_rm.run(cfg)
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    write_json(result, {
        "side": "ours", "pairs_per_step": cfg.batch_size,
        "step_seconds": [s["pairs"] / s["pairs_per_s"] for s in steps], "losses": [s["loss"] for s in steps],
        "accuracy": [s["accuracy"] for s in steps], "eval_accuracy": final.get("eval_accuracy"), "eval_loss": final.get("eval_loss"),
        "final": final, "peak_rss_mib_train": rss[0] if rss else None, "peak_rss_mib_exit": peak_rss_mib(),
        "wall_seconds_run": wall, "versions": versions("torch", "transformers", "tokenizers", "peft", "rlhf-cli"),
    })


def worker_trl(plan_path: Path, result: Path) -> None:
    """TRL's RewardTrainer on our pre-tokenized rows, in plan order. Does not import rlhf_cli."""
    set_threads()
    import torch
    from datasets import Dataset
    from sft_worker_trl import StepTimer, record_losses
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    plan = json.loads(plan_path.read_text())
    init = Path(plan_path).parent / "init"
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForSequenceClassification.from_pretrained(init, num_labels=1, dtype=torch.float32)
    k, steps = plan["knobs"], plan["steps"]
    total = plan["total_steps"]
    knobs = dict(
        per_device_train_batch_size=plan["batch_size"], gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=k["lr"], lr_scheduler_type=k["schedule"], warmup_steps=int(k["warmup_frac"] * total),
        weight_decay=k["weight_decay"], max_grad_norm=k["max_grad_norm"], seed=k["seed"],
        bf16=False, fp16=False, use_cpu=True, activation_checkpointing=False, max_length=None,
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )
    args = RewardConfig(output_dir=tempfile.mkdtemp(prefix="trl-rm-"), **knobs)
    timer = StepTimer()
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(plan["rows"]), processing_class=tok,
                            callbacks=[timer])
    assert trainer.processing_class.pad_token_id == plan["pad_id"], "TRL would pad with another token"
    losses = record_losses(trainer)
    t0 = time.perf_counter()
    trainer.train()
    write_json(result, {
        "side": "trl", "pairs_per_step": plan["batch_size"], "step_seconds": timer.step_seconds,
        "cycle_seconds": timer.cycle_seconds, "losses": [float(x) for x in losses],
        "gradient_checkpointing": timer.checkpointing_active, "bf16": args.bf16, "knobs": knobs,
        "peak_rss_mib_train": timer.rss_at_end, "peak_rss_mib_exit": peak_rss_mib(),
        "wall_seconds_train": time.perf_counter() - t0,
        "versions": versions("torch", "transformers", "tokenizers", "accelerate", "datasets", "trl"),
    })


if __name__ == "__main__":
    main()
