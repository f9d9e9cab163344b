"""DPO training throughput on HH-RLHF: `rlhf dpo` vs TRL 1.16 `DPOTrainer`, SmolLM2-135M, fp32, CPU.

    .venv/bin/python benchmarks/dpo_train.py                          # 8 steps per side, 2 dropped (~10 min on 2 cores)
    .venv/bin/python benchmarks/dpo_train.py --steps 3 --warmup 1     # smoke test
    .venv/bin/python benchmarks/dpo_train.py --precompute --out benchmarks/results/dpo_train_precompute.json
    .venv/bin/python benchmarks/dpo_train.py --layout packed --out benchmarks/results/dpo_train_packed.json
    .venv/bin/python benchmarks/dpo_train.py --layout padded --out benchmarks/results/dpo_train_padded.json

Same work on both sides (/work/shared/BENCHMARKS.md):
  * one model dir (benchmarks/prepare_model.py, fp32) as policy and as frozen reference on both sides
    (ours: `ref=None` -> the starting weights loaded a second time; TRL: `ref_model=None` -> it loads
    the policy's path again), dropout off on both;
  * one tokenization: HH-RLHF helpful-base pairs shuffled with seed 0, tokenized by our pref_data
    (`format=raw`: HH transcript -> prompt + " answer" + EOS). Only pairs whose chosen and rejected
    sequences share the same prompt tokens and fit in --max-len untruncated are used (TRL's layout has
    one prompt per pair, and nothing is then cut on either side); the first --steps x --batch-size of
    them are written to a JSONL that `rlhf dpo` reads. Our data plan (its seeded shuffle) is rebuilt
    here and TRL gets exactly those `prompt_ids` / `chosen_ids` / `rejected_ids` rows in plan order,
    with `train_sampling_strategy="sequential"`, so step i is the same batch. TRL 1.16 has no bypass
    for pre-tokenized preference rows (its `_prepare_dataset` always extracts a prompt, appends the
    EOS *text* and re-tokenizes), so the TRL worker replaces `_prepare_dataset` by the identity: TRL
    trains on our token ids (its own tokenization runs before training and is not timed anyway);
  * sigmoid loss, beta 0.1, AdamW lr 1e-6 constant (no warmup), weight decay 0, grad-norm clip 1.0,
    summed answer log-probs, the loss averaged over the pairs of the step;
  * fp32 (`bf16=False` explicitly), no gradient checkpointing (TRL's default is on), 2 threads, no
    dataloader workers, logging/saving off;
  * reference handling matched: on the fly by default; --precompute sets ours `precompute_ref=True`
    and TRL's `precompute_ref_log_probs=True` (precompute batch = --batch-size on both);
  * layout: TRL 1.16 accepts `padding_free=True` but warns that it is "temporarily unavailable after
    a refactor" and falls back to padding, so TRL runs right-padded prompt+answer rows (width: the
    longest sequence). Ours runs its default, each prompt computed once with its answers after it
    (`--layout shared`, pref_layouts.share_prompts); `--layout packed` packs whole sequences padding-free
    (pref_layouts.pack) and `--layout padded` gives ours TRL's padded layout (like for like). Throughput
    counts the sequences' non-padding tokens (a shared prompt's tokens once for each sequence that uses it: the same count on both
    sides, whatever the layout).
  * each side in its own process (ours in .venv, TRL in .bench-venv), one after the other; the first
    --warmup steps are dropped; min/median/max over the rest; the load average before each side.

Step times: ours from the loop's own clock (metrics.jsonl: tokens / tokens_per_s, which covers
batch building, both forwards, backward, clip and the optimizer step); TRL from a TrainerCallback
(on_step_begin -> on_step_end: forward, reference forward, backward, clip, optimizer; its
collation happens before on_step_begin, so this slightly favours TRL) plus, as a second number,
the time between successive on_step_end calls (collation and bookkeeping included).
Raw numbers go to benchmarks/results/dpo_train.json.
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
KNOBS = {"loss": "sigmoid", "beta": 0.1, "lr": 1e-6, "schedule": "constant", "warmup": 0.0, "weight_decay": 0.0,
         "max_grad_norm": 1.0, "seed": 0}


# ---------------------------------------------------------------- driver (project .venv)


def select_pairs(model_dir: Path, n: int, max_len: int, tmp: Path) -> list[dict]:
    """The first n shuffled HH pairs that both sides can run identically (shared prompt, no truncation)."""
    from rlhf_cli.commands.dpo import DpoConfig, load_rows
    from rlhf_cli.config import build
    from rlhf_cli.data import pref_data
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    if not HH.is_file():
        sys.exit(f"benchmark data missing: {HH}\n  set RLHF_BENCH_HH=/path/to/hh-rlhf/test.jsonl.gz")
    with gzip.open(HH, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows if r["chosen"] != r["rejected"]]
    random.Random(0).shuffle(rows)
    tok = load_tokenizer(parse_model_spec(str(model_dir)))
    picked: list[dict] = []
    for start in range(0, len(rows), 200):
        chunk = rows[start : start + 200]
        (tmp / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
        parsed, _ = load_rows(build(DpoConfig, data=str(tmp / "pool.jsonl"), model=str(model_dir), format="raw"))
        for raw, row in zip(chunk, parsed, strict=True):
            ex = pref_data.tokenize_prefs(tok, [row], "raw", max_len + 1)  # +1: see whether it fits uncut
            if not ex or len(ex[0].seqs) != 2:
                continue
            (c, r), (nc, nr) = ex[0].seqs, ex[0].answer_lens
            if max(len(c), len(r)) <= max_len and c[:-nc] == r[:-nr]:
                picked.append(raw)
                if len(picked) == n:
                    return picked
    sys.exit(f"only {len(picked)} usable HH pairs at --max-len {max_len}; lower --steps x --batch-size")


def build_plan(cfg_kw: dict, steps: int) -> dict:
    """Our tokenization + our plan, exactly as `rlhf_cli.commands.dpo.run` builds them."""
    from rlhf_cli import training
    from rlhf_cli.commands.dpo import DpoConfig, load_rows
    from rlhf_cli.config import build
    from rlhf_cli.data import pref_data
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    cfg = build(DpoConfig, **cfg_kw)
    tok = load_tokenizer(parse_model_spec(cfg.model))
    rows, _ = load_rows(cfg)
    tokenized = pref_data.tokenize_prefs(tok, rows, cfg.format, cfg.max_len)
    train, _ = pref_data.split_examples(list(enumerate(tokenized)), [], cfg.eval_split, cfg.train.seed)
    plan = training.plan_epochs(lambda e: pref_data.epoch_batches(train, cfg.train.seed, e, cfg.batch_size), cfg.train, 1)
    mbs = [[x for mb in plan.step(i) for x in mb] for i in range(steps)]
    out_rows = []
    for mb in mbs:
        for _idx, ex in mb:
            (c, r), (nc, nr) = ex.seqs, ex.answer_lens
            assert c[:-nc] == r[:-nr], "pair without a shared prompt slipped through"
            out_rows.append({"prompt_ids": c[:-nc], "chosen_ids": c[-nc:], "rejected_ids": r[-nr:]})
    return {"batch_size": cfg.batch_size, "max_len": cfg.max_len, "steps": steps, "pad_id": tok.pad_token_id,
            "eos_id": tok.eos_token_id, "rows": out_rows, "precompute": cfg.precompute_ref,
            "step_tokens": [pref_data.token_count([ex for _i, ex in mb]) for mb in mbs], "knobs": KNOBS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="steps discarded from the throughput numbers")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--sides", default="ours,trl", help="comma list run in order; a repeated side is stored as SIDE-2")
    ap.add_argument("--layout", choices=("shared", "packed", "padded"), default="shared",
                    help="ours: each prompt once (the default), padding-free packed sequences, or TRL's padded rows")
    ap.add_argument("--precompute", action="store_true",
                    help="reference log-probs before training (ours precompute_ref, TRL precompute_ref_log_probs)")
    ap.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "dpo_train.json")
    args = ap.parse_args()
    if args.worker == "ours":
        return worker_ours(args.cfg, args.result)
    if args.worker == "trl":
        return worker_trl(args.plan, args.result)
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    sides = args.sides.split(",")
    if "trl" in sides and not PEER_PY.exists():
        sys.exit(f"{PEER_PY} missing: create .bench-venv with trl==1.16.0")

    from prepare_model import DEFAULT_OUT, prepare

    model_dir = prepare(DEFAULT_OUT)
    results: dict = {"benchmark": "dpo_train", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                  if k not in ("worker", "plan", "cfg", "result")},
                     "data": str(HH), "model": str(model_dir.relative_to(HERE.parent)), "knobs": KNOBS,
                     "env": {"cpu": cpu_info(), "ours_versions": versions("torch", "transformers", "tokenizers", "rlhf-cli")},
                     "runs": {}}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-dpo-") as tmp_s:
        tmp = Path(tmp_s)
        pairs = select_pairs(model_dir, args.steps * args.batch_size, args.max_len, tmp)
        (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
        cfg_kw = dict(data=str(tmp / "train.jsonl"), out=str(tmp / "dpo"), model=str(model_dir), format="raw",
                      max_len=args.max_len, batch_size=args.batch_size, max_steps=args.steps, loss=KNOBS["loss"],
                      beta=KNOBS["beta"], lr=KNOBS["lr"], schedule=KNOBS["schedule"], warmup=KNOBS["warmup"],
                      weight_decay=KNOBS["weight_decay"], max_grad_norm=KNOBS["max_grad_norm"],
                      precompute_ref=args.precompute, packing=args.layout == "packed", share_prompt=args.layout == "shared",
                      gradient_checkpointing=False,
                      save_every=0, seed=KNOBS["seed"], device="cpu", dtype="fp32")
        (tmp / "cfg.json").write_text(json.dumps(cfg_kw))
        plan = build_plan(cfg_kw, args.steps)
        plan["model"] = str(model_dir)
        (tmp / "plan.json").write_text(json.dumps(plan))
        print(f"{len(pairs)} pairs; non-padding tokens per step {plan['step_tokens']}", file=sys.stderr)
        for side in sides:
            res_path = tmp / f"{side}.json"
            if side == "ours":
                cmd = [str(OURS_PY), __file__, "--worker", "ours", "--cfg", str(tmp / "cfg.json"), "--result", str(res_path)]
            else:
                cmd = [str(PEER_PY), __file__, "--worker", "trl", "--plan", str(tmp / "plan.json"), "--result", str(res_path)]
            load = run_worker(cmd, RESULTS / f"dpo_train_{side}.log")
            res = json.loads(res_path.read_text())
            res["loadavg_1min_before"] = load
            res["loadavg_1min_after"] = os.getloadavg()[0]
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
        out[side] = {"tokens_per_s": summarize([t / s for t, s in zip(step_tokens[warmup:], secs[warmup:], strict=False)]),
                     "pairs_per_s": summarize([r["pairs_per_step"] / s for s in secs[warmup:]]),
                     "step_seconds": summarize(secs[warmup:]), "peak_rss_mib": r["peak_rss_mib_train"],
                     "aggregate_tokens_per_s": sum(step_tokens[warmup:]) / sum(secs[warmup:])}
        if r.get("cycle_seconds"):
            cyc = r["cycle_seconds"][:n]
            out[side]["tokens_per_s_cycle"] = summarize([t / s for t, s in zip(step_tokens[warmup:], cyc[warmup:], strict=False)])
    base = {k.split("-")[0] for k in runs}
    if {"ours", "trl"} <= base:
        o, t = runs["ours"], runs["trl"]
        ow, tw = o["step_seconds"][warmup:n], t["step_seconds"][warmup:n]
        out["ratio_median_tokens_per_s"] = out["ours"]["tokens_per_s"]["median"] / out["trl"]["tokens_per_s"]["median"]
        out["ratio_paired_steps"] = summarize([ts / os_ for os_, ts in zip(ow, tw, strict=True)])
        out["ratio_peak_rss"] = o["peak_rss_mib_train"] / t["peak_rss_mib_train"]
        out["loss_step1"] = {"ours": o["losses"][0], "trl": t["losses"][0], "abs_diff": abs(o["losses"][0] - t["losses"][0])}
        out["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(o["losses"][:n], t["losses"][:n], strict=True))
        for k in ("logps_chosen", "logps_rejected"):
            if o.get(k) and t.get(k):
                out[f"{k}_step1"] = {"ours": o[k][0], "trl": t[k][0], "abs_diff": abs(o[k][0] - t[k][0])}
                out[f"{k}_max_abs_diff"] = max(abs(a - b) for a, b in zip(o[k][:n], t[k][:n], strict=True))
        best = {side: max(v["tokens_per_s"]["median"] for k, v in out.items() if isinstance(v, dict) and "tokens_per_s" in v
                          and k.split("-")[0] == side) for side in ("ours", "trl")}
        out["ratio_best_run_median_tokens_per_s"] = best["ours"] / best["trl"]
    return out


def report(results: dict) -> None:
    env, c, st = results["env"], results["comparison"], results["settings"]
    cpu = env["cpu"]
    print(f"CPU: {cpu['model']} ({cpu['affinity']} usable CPUs, {' '.join(cpu['simd_flags'])}), load at start {cpu['loadavg_at_start']}")
    r0 = next(iter(results["runs"].values()))
    print(f"versions: {r0['versions']}" if len(results["runs"]) == 1 else
          "versions: " + "; ".join(f"{k}: {v['versions']}" for k, v in results["runs"].items()))
    print(f"SmolLM2-135M DPO (sigmoid, beta 0.1), fp32, {st['batch_size']} pairs/step, max_len {st['max_len']}, "
          f"reference {'precomputed' if st['precompute'] else 'on the fly'}, ours {st.get('layout', 'packed')}, "
          f"HH-RLHF helpful-base; "
          f"median of steps {st['warmup'] + 1}..{st['steps']}")
    print(f"{'side':7s} {'tok/s median':>12s} {'min':>7s} {'max':>7s} {'step s med':>10s} {'pairs/s':>8s} {'peak RSS MiB':>12s}  load before->after")
    for side, s in c.items():
        if isinstance(s, dict) and "tokens_per_s" in s:
            r = results["runs"][side]
            tp = s["tokens_per_s"]
            print(f"{side:7s} {tp['median']:12.1f} {tp['min']:7.1f} {tp['max']:7.1f} {s['step_seconds']['median']:10.2f} "
                  f"{s['pairs_per_s']['median']:8.3f} {s['peak_rss_mib']:12.0f}  {r['loadavg_1min_before']:.1f}->{r['loadavg_1min_after']:.1f}")
            if "tokens_per_s_cycle" in s:
                print(f"{'':7s} (TRL step-end to step-end, collation included: {s['tokens_per_s_cycle']['median']:.1f} tok/s median)")
    if "ratio_median_tokens_per_s" in c:
        print(f"ours / TRL: {c['ratio_median_tokens_per_s']:.2f}x median tok/s (target >= 1.3x), paired per-step median "
              f"{c['ratio_paired_steps']['median']:.2f}x; peak RSS ours/TRL {c['ratio_peak_rss']:.2f}")
        ls = c["loss_step1"]
        print(f"step-1 loss ours {ls['ours']:.6f} TRL {ls['trl']:.6f} |diff| {ls['abs_diff']:.2e}; max |loss diff| over the steps "
              f"{c['loss_max_abs_diff']:.2e}")
        for k in ("logps_chosen", "logps_rejected"):
            if f"{k}_step1" in c:
                d = c[f"{k}_step1"]
                print(f"step-1 mean {k} ours {d['ours']:.4f} TRL {d['trl']:.4f} |diff| {d['abs_diff']:.2e}; "
                      f"max over the steps {c[f'{k}_max_abs_diff']:.2e}")


# ---------------------------------------------------------------- workers


def worker_ours(cfg_path: Path, result: Path) -> None:
    """`rlhf_cli.commands.dpo.run` unmodified; step times from the loop's own clock (metrics.jsonl)."""
    set_threads()
    from rlhf_cli.commands import dpo
    from rlhf_cli.models import checkpoint

    rss: list[float] = []
    real_save = checkpoint.save_checkpoint

    def save_and_note(*a, **kw):
        rss.append(peak_rss_mib())
        return real_save(*a, **kw)

    checkpoint.save_checkpoint = save_and_note
    from rlhf_cli.config import build

    cfg = build(dpo.DpoConfig, **json.loads(cfg_path.read_text()))
    t0 = time.perf_counter()
    final = dpo.run(cfg)
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [s for s in steps if "tokens_per_s" in s]
    import torch

    write_json(result, {
        "side": "ours", "pairs_per_step": cfg.batch_size,
        "step_seconds": [s["tokens"] / s["tokens_per_s"] for s in steps], "step_tokens": [s["tokens"] for s in steps],
        "losses": [s["loss"] for s in steps], "logps_chosen": [s["logps_chosen"] for s in steps],
        "logps_rejected": [s["logps_rejected"] for s in steps], "final": final,
        "config": {"precompute_ref": cfg.precompute_ref, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                   "dtype": cfg.train.dtype, "torch_threads": torch.get_num_threads()},
        "peak_rss_mib_train": rss[0] if rss else peak_rss_mib(), "peak_rss_mib_exit": peak_rss_mib(),
        "wall_seconds_run": wall, "versions": versions("torch", "transformers", "tokenizers", "rlhf-cli"),
    })


def worker_trl(plan_path: Path, result: Path) -> None:
    """TRL's DPOTrainer on our pre-tokenized rows, in plan order. Does not import rlhf_cli."""
    set_threads()
    import dataclasses

    import torch
    from datasets import Dataset
    from sft_worker_trl import StepTimer, record_losses
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    plan = json.loads(plan_path.read_text())
    tok = AutoTokenizer.from_pretrained(plan["model"])
    model = AutoModelForCausalLM.from_pretrained(plan["model"], dtype=torch.float32)
    k, steps, bs = plan["knobs"], plan["steps"], plan["batch_size"]
    knobs = dict(
        per_device_train_batch_size=bs, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=k["lr"], lr_scheduler_type=k["schedule"], warmup_steps=0,
        weight_decay=k["weight_decay"], max_grad_norm=k["max_grad_norm"], seed=k["seed"],
        loss_type=[k["loss"]], beta=k["beta"], max_length=plan["max_len"], padding_free=False,
        precompute_ref_log_probs=plan["precompute"], precompute_ref_batch_size=bs,
        bf16=False, fp16=False, use_cpu=True, activation_checkpointing=False,
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    if "shuffle_dataset" in names:
        knobs["shuffle_dataset"] = False
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), **knobs)
    # our token ids as they are: TRL 1.16 always re-tokenizes text rows (see the module docstring)
    DPOTrainer._prepare_dataset = lambda self, dataset, *a, **kw: dataset
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(plan["rows"]), processing_class=tok,
                         callbacks=[timer])
    pad = trainer.data_collator.pad_token_id
    losses = record_losses(trainer)
    t0 = time.perf_counter()
    trainer.train()
    m = trainer._metrics["train"]
    write_json(result, {
        "side": "trl", "pairs_per_step": bs, "step_seconds": timer.step_seconds,
        "cycle_seconds": timer.cycle_seconds, "losses": [float(x) for x in losses],
        "logps_chosen": list(m.get("logps/chosen", [])), "logps_rejected": list(m.get("logps/rejected", [])),
        "config": {"gradient_checkpointing": timer.checkpointing_active, "bf16": args.bf16, "padding_free": trainer.padding_free,
                   "precompute_ref_log_probs": trainer.precompute_ref_logps, "ref_model_loaded": trainer.ref_model is not None,
                   "pad_token_id": pad, "optim": str(args.optim), "attn_implementation": model.config._attn_implementation,
                   "torch_threads": torch.get_num_threads(), "overrides": knobs},
        "peak_rss_mib_train": timer.rss_at_end, "peak_rss_mib_exit": peak_rss_mib(),
        "wall_seconds_train": time.perf_counter() - t0,
        "versions": versions("torch", "transformers", "tokenizers", "accelerate", "datasets", "trl"),
    })


if __name__ == "__main__":
    main()
