"""GRPO step time: `rlhf grpo` vs TRL 1.16 `GRPOTrainer` (no vLLM on either side), same model and settings, CPU.

    .venv/bin/python benchmarks/grpo_step.py                          # SmolLM2-135M, 8 steps per side (~5 min)
    .venv/bin/python benchmarks/grpo_step.py --model builtin-tiny --steps 3 --warmup 1   # smoke test (< 1 min)
    .venv/bin/python benchmarks/grpo_step.py --sides trl,ours,trl,ours   # repeats, stored as SIDE-2

Target (/work/shared/BENCHMARKS.md): ours >= 1.3x TRL 1.16 GRPOTrainer (median step time), peak RSS no higher.

Same work on both sides (/work/shared/BENCHMARKS.md):
  * model: SmolLM2-135M-Instruct fp32 from prepare_model.py (or --model builtin-tiny, our 0.8M-parameter
    Llama saved as an HF dir, for smoke tests); no reference model on either side (beta 0);
  * prompts: 64 Alpaca instructions rendered by *our* chat-template code (checked equal to
    `apply_chat_template`), all of one token length, so no batch is padded and the order each side
    draws them in changes no shape. Ours reads them as {"prompt": text} rows (--format chat); TRL gets
    them as conversations and renders them itself; both workers check that every prompt they generate
    from has exactly the plan's token ids;
  * reward: one cheap deterministic rule, the share of lowercase ASCII letters a-z among the
    completion's characters (0 for an empty completion), written once to a temp file that both sides
    import: ours through `--judge rule:FILE.py:score` (FN(completion, row)), TRL through
    `reward_funcs=[lowercase_share]` (the same function over its decoded completions). Both decode the
    completion without special tokens. The reward is continuous, so (almost) no group has zero std;
  * knobs: K = 4 completions per prompt, 4 prompts per step (16 completions), at most 32 new tokens,
    temperature 1.0, top-p 1 / top-k 0 (off), stop at EOS; advantages (r - group mean) / (group std +
    1e-4) (scale_rewards "group"), loss "dapo" (token sum / the step's completion tokens), clip 0.2 on
    both sides (epsilon = epsilon_high = 0.2), token-level importance ratio, beta 0, 1 iteration, one
    optimizer step per generation batch (TRL: per_device_train_batch_size=16, gradient_accumulation_steps=1,
    steps_per_generation=1, so generation_batch_size=16; both workers count the real optimizer steps
    and generation calls: exactly 1 of each per step); AdamW (fused on both) lr 1e-6 constant, no warmup,
    no weight decay, max_grad_norm 1.0; fp32 (TRL bf16=False), no gradient checkpointing (checked on the
    TRL model), dropout off, 2 threads, logging/saving off, no dataloader workers, seed 0;
  * each side in its own process, one after the other (ours in .venv, TRL in .bench-venv); the first
    --warmup steps are dropped, min/median/max over the rest; the 1-minute load average and the
    process's CPU-seconds per wall second are recorded for each side.

What the timers cover (details in each worker's docstring): a step is wall time from one step boundary
to the next (TRL: its on_step_end callback; ours: the top of the loop), so each side pays for all its
own per-step work. generate = sampling the 16 completions (ours: KV-cached sampler keeping each token's
log-prob and entropy, text decode, padding; TRL: prompt tokenisation + model.generate + EOS cut +
batch_decode; `sampling` = model.generate alone); score = the reward calls + advantages (TRL also pads
the lists to tensors here; ours computes its advantages at the start of `train`); train = the update
(forward with grad, loss, backward, clip, AdamW step; TRL also its lr scheduler step and batch
shuffle); other = the rest (ours: the metrics line and progress bar; TRL: fetching the next
generation batch, Trainer bookkeeping).

Differences that stay (each side's own design, not knobs): the two sides sample different tokens, so
completion lengths and the clipped share (cut off at 32 tokens without EOS) differ: both are reported,
and generated tokens per second compares per generated token. Neither side runs a second no-grad
forward for the old log-probs (ours keeps the sampler's, TRL detaches the training forward's, both
exact for one iteration); ours gets the entropy from the sampler, TRL from its training forward (fused
log-prob + entropy head). TRL generates with transformers' `generate` (DynamicCache); ours with its own
decode loop.

Raw numbers: benchmarks/results/grpo_step.json; worker logs: benchmarks/results/grpo_<side>.log.
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
from _common import HERE, OURS_PY, PEER_PY, RESULTS, ROOT, cpu_info, run_worker, summarize, versions, write_json  # noqa: E402
from ppo_step import cpu_pressure, pick_prompts, policy_dir  # noqa: E402

KNOBS = {"prompts_per_step": 4, "group_size": 4, "max_completion_length": 32, "temperature": 1.0,
         "loss_type": "dapo", "scale_rewards": "group", "beta": 0.0, "num_iterations": 1, "clip": 0.2,
         "lr": 1e-6, "max_grad_norm": 1.0, "seed": 0}
PHASES = ("generate", "score", "train", "other")
GOAL = 1.3
REWARD_PY = '''"""grpo_step.py's benchmark reward: the share of lowercase ASCII letters in a completion."""


def lowercase(text):
    return sum("a" <= ch <= "z" for ch in text) / len(text) if text else 0.0


def score(completion, row):
    """rlhf grpo --judge rule:THIS_FILE.py:score"""
    return lowercase(completion)


def lowercase_share(completions, **kwargs):
    """TRL reward_funcs=[lowercase_share]: conversational completions are [{"role": "assistant", "content": ...}]."""
    return [lowercase(c[-1]["content"] if isinstance(c, list) else c) for c in completions]
'''


# ---------------------------------------------------------------- analysis


def checks(res: dict, steps: int, rows: int) -> list[str]:
    """What must hold for the two sides to be doing the same work; each failure is one line."""
    bad = []
    if len(res["step_seconds"]) != steps:
        bad.append(f"{len(res['step_seconds'])} steps recorded, expected {steps}")
    if any(n != 1 for n in res["optimizer_steps_per_step"]):
        bad.append(f"optimizer steps per step {res['optimizer_steps_per_step']}, expected 1 each")
    if any(len(r) != rows for r in res["completion_tokens"]):
        bad.append(f"completions per step {[len(r) for r in res['completion_tokens']]}, expected {rows}")
    if res["prompts_not_in_plan"]:
        bad.append(f"{res['prompts_not_in_plan']} prompts were not token-identical to the plan's")
    if res["config"].get("gradient_checkpointing"):
        bad.append("gradient checkpointing is on")
    if res["side"] == "trl":
        if any(n != 1 for n in res["generations_per_step"]):
            bad.append(f"generation batches per step {res['generations_per_step']}, expected 1 each")
        if res["old_logps_forward"]:
            bad.append("TRL ran a separate old-log-prob forward")
        if res["config"]["ref_model"]:
            bad.append("TRL built a reference model")
    elif any(n != 1 for n in res["sampling_calls"]):
        bad.append(f"sampling calls per step {res['sampling_calls']}, expected 1 each")
    return bad


def analyse(res: dict, warmup: int) -> dict:
    secs = res["step_seconds"][warmup:]
    toks = [sum(r) for r in res["completion_tokens"][warmup:]]
    n_rows = sum(len(r) for r in res["completion_tokens"][warmup:])
    cut = sum(sum(r) for r in res["truncated"][warmup:])
    cpu = res["step_cpu_seconds"][warmup:]
    # a quiet machine gives ~2 CPU-seconds per wall second (2 threads); much less means someone else had the cores
    util = [c / s for c, s in zip(cpu, secs, strict=False)]
    phases = {p: v for p, v in res["phases"].items()}
    return {
        "step_seconds": summarize(secs),
        "cpu_seconds_per_wall_second": summarize(util),
        "steps_below_1_6_cpus": sum(u < 1.6 for u in util),
        "step_seconds_quiet_steps": summarize([s for s, u in zip(secs, util, strict=False) if u >= 1.8]),
        "phase_seconds_median": {p: summarize(v[warmup:]).get("median") for p, v in phases.items()},
        "phase_share_of_total": {p: sum(phases[p][warmup:]) / sum(secs) for p in PHASES},
        "completion_tokens_per_step": summarize([float(t) for t in toks]),
        "mean_completion_length": sum(toks) / max(1, n_rows),
        "clipped_share": cut / max(1, n_rows),
        "decode_steps_per_step": summarize([float(w) for w in res["decode_width"][warmup:]]),
        "generated_tokens_per_s": sum(toks) / sum(secs),
        "reward_mean": sum(res["reward_mean"][warmup:]) / max(1, len(res["reward_mean"][warmup:])),
        "peak_rss_mib_train": res["peak_rss_mib_train"], "peak_rss_mib_exit": res["peak_rss_mib_exit"],
    }


def compare(runs: dict) -> dict:
    if "ours" not in runs or "trl" not in runs:
        return {}
    best = {side: min(r["summary"]["step_seconds"]["median"] for n, r in runs.items() if n.split("-")[0] == side)
            for side in ("ours", "trl")}
    o, t = runs["ours"]["summary"], runs["trl"]["summary"]
    contended = any(r["summary"]["cpu_seconds_per_wall_second"].get("median", 0.0) < 1.6 for r in runs.values())
    oq, tq = o["step_seconds_quiet_steps"], t["step_seconds_quiet_steps"]
    speedup = t["step_seconds"]["median"] / o["step_seconds"]["median"]
    rss = o["peak_rss_mib_train"] / t["peak_rss_mib_train"]
    return {
        "contended": contended,
        "speedup_median_step": speedup,
        "speedup_best_run_median_step": best["trl"] / best["ours"],
        "speedup_median_quiet_steps": tq["median"] / oq["median"] if oq.get("n") and tq.get("n") else None,
        # the sides sample different tokens: the same ratio per generated completion token
        "speedup_generated_tokens_per_s": o["generated_tokens_per_s"] / t["generated_tokens_per_s"],
        "rss_ours_over_trl": rss,
        "goal": f">= {GOAL}x TRL 1.16 GRPOTrainer (median step time), peak RSS no higher",
        # not judged on a contended run: rerun on a quiet machine
        "goal_met": None if contended else speedup >= GOAL and rss <= 1.0,
    }


def print_table(results: dict) -> None:
    env, st, k = results["env"], results["settings"], results["knobs"]
    print(f"CPU: {env['cpu']['model']}  ({env['cpu']['affinity']} usable CPUs)  flags: {' '.join(env['cpu']['simd_flags'])}")
    for name, r in results["runs"].items():
        v = r["versions"]
        extra = f", trl {v['trl']}, accelerate {v.get('accelerate')}" if "trl" in v else f", rlhf-cli {v.get('rlhf-cli')}"
        print(f"{name}: torch {v['torch']}, transformers {v['transformers']}{extra}")
    print(f"{results['model']} fp32; {k['prompts_per_step']} prompts x K={k['group_size']} per step, <= {k['max_completion_length']} "
          f"new tokens, T={k['temperature']}, loss {k['loss_type']}, beta {k['beta']}, lr {k['lr']}; prompt length "
          f"{results['prompt_length']} tokens; {st['steps'] - st['warmup']} measured steps after {st['warmup']} warm-up\n")
    hdr = (f"{'side':7s} {'step s median':>13s} {'min':>6s} {'max':>6s} {'generate':>8s} {'score':>6s} {'train':>6s} "
           f"{'other':>6s} {'gen tok/s':>9s} {'mean len':>8s} {'clipped':>7s} {'decode':>6s} {'peak RSS MiB':>12s} "
           f"{'CPUs busy':>9s} {'load before/after':>17s}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in results["runs"].items():
        s, ph = r["summary"], r["summary"]["phase_seconds_median"]
        print(f"{name:7s} {s['step_seconds']['median']:13.2f} {s['step_seconds']['min']:6.2f} {s['step_seconds']['max']:6.2f} "
              f"{ph['generate']:8.2f} {ph['score']:6.2f} {ph['train']:6.2f} {ph['other']:6.2f} "
              f"{s['generated_tokens_per_s']:9.1f} {s['mean_completion_length']:8.1f} {s['clipped_share']:7.2f} "
              f"{s['decode_steps_per_step']['median']:6.0f} {s['peak_rss_mib_train']:12.0f} "
              f"{s['cpu_seconds_per_wall_second'].get('median', float('nan')):9.2f} "
              f"{r['loadavg_1min_before']:8.1f}/{r['loadavg_1min_after']:<8.1f}")
    for name, r in results["runs"].items():
        ph = r["summary"]["phase_seconds_median"]
        if "sampling" in ph:
            print(f"  {name}: model.generate alone {ph['sampling']:.2f} s of generate; reward function {ph['reward'] * 1e3:.1f} ms of score")
    busy = {n: r["summary"]["cpu_seconds_per_wall_second"].get("median", 0.0) for n, r in results["runs"].items()}
    if any(b < 1.6 for b in busy.values()):
        print(f"WARNING: contended run (CPUs busy {busy}): other jobs shared the cores; rerun on a quiet machine")
    for name, bad in results["checks"].items():
        for line in bad:
            print(f"CHECK FAILED ({name}): {line}")
    c = results["comparison"]
    if c:
        print(f"\nours vs TRL: {c['speedup_median_step']:.2f}x (median step time; best run of each side "
              f"{c['speedup_best_run_median_step']:.2f}x; per generated token {c['speedup_generated_tokens_per_s']:.2f}x); "
              f"peak RSS ours/TRL {c['rss_ours_over_trl']:.2f}")
        verdict = {None: "not judged (contended run)", True: "MET", False: "missed"}[c["goal_met"]]
        q = c["speedup_median_quiet_steps"]
        print(f"goal {c['goal']}: {verdict}" + (f"; over the uncontended steps only: {q:.2f}x" if q else ""))
    print("CPUs busy = median process CPU-seconds per wall second over the measured steps (2.0 = both cores ours; "
          "lower = contended: rerun)")
    print("phases are medians in seconds: generate = sampling + decode, score = rewards + advantages, "
          "train = forward/backward/clip/AdamW, other = the rest of the step; decode = generated columns per step")


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "builtin-tiny", "builtin-small"))
    ap.add_argument("--steps", type=int, default=8, help="GRPO steps per side (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--sides", default="trl,ours", help="comma list run in order; a repeated side is stored as SIDE-2")
    ap.add_argument("--out", type=Path, default=RESULTS / "grpo_step.json")
    args = ap.parse_args()
    if args.steps - args.warmup < 1:
        sys.exit("--steps must exceed --warmup")
    sides = args.sides.split(",")
    if unknown := set(sides) - {"ours", "trl"}:
        sys.exit(f"unknown side(s) {sorted(unknown)}: use ours and trl")
    if "trl" in sides and not PEER_PY.exists():
        sys.exit(f"{PEER_PY} missing: build .bench-venv (torch==2.13.0 trl==1.16.0), see benchmarks/run_all.sh")

    policy = policy_dir(args.model)
    texts, prompt_ids = pick_prompts(policy, args.prompts)
    rows = KNOBS["prompts_per_step"] * KNOBS["group_size"]
    results: dict = {
        "benchmark": "grpo_step", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": str(policy.relative_to(ROOT)), "knobs": KNOBS, "reward": "share of lowercase ASCII letters (see REWARD_PY)",
        "prompt_length": len(prompt_ids[0]), "n_prompts": len(prompt_ids),
        "env": {"cpu": cpu_info(), "ours_versions": versions("torch", "transformers", "tokenizers", "rlhf-cli")},
        "loadavg_start": os.getloadavg(), "cpu_pressure_start": cpu_pressure(), "runs": {}, "checks": {},
    }
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-grpo-") as tmp_s:
        tmp = Path(tmp_s)
        prompts_path = tmp / "prompts.jsonl"
        prompts_path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        reward_path = tmp / "bench_reward.py"
        reward_path.write_text(REWARD_PY)
        plan = {"policy": str(policy), "prompts": str(prompts_path), "texts": texts, "prompt_ids": prompt_ids,
                "reward_file": str(reward_path), "reward_fn_ours": "score", "reward_fn_trl": "lowercase_share",
                "steps": args.steps, "knobs": KNOBS}
        plan_path = tmp / "plan.json"
        plan_path.write_text(json.dumps(plan))
        print(f"{len(texts)} prompts of {len(prompt_ids[0])} tokens; policy {policy}", file=sys.stderr)
        for i, side in enumerate(sides):
            name = side if side not in results["runs"] else f"{side}-2"
            res_path = tmp / f"{side}-{i}.json"
            if side == "ours":
                cmd = [str(OURS_PY), str(HERE / "grpo_worker_ours.py"), "--plan", str(plan_path), "--work",
                       str(tmp / f"work-{i}"), "--result", str(res_path)]
            else:
                cmd = [str(PEER_PY), str(HERE / "grpo_worker_trl.py"), "--plan", str(plan_path), "--result", str(res_path)]
            psi = cpu_pressure()
            load = run_worker(cmd, RESULTS / f"grpo_{name}.log")
            res = json.loads(res_path.read_text())
            res["loadavg_1min_before"], res["loadavg_1min_after"] = load, os.getloadavg()[0]
            res["cpu_pressure_before"], res["cpu_pressure_after"] = psi, cpu_pressure()
            results["checks"][name] = checks(res, args.steps, rows)
            if len(res["step_seconds"]) < args.steps:
                sys.exit(f"{side}: only {len(res['step_seconds'])} steps recorded, expected {args.steps}")
            res["summary"] = analyse(res, args.warmup)
            results["runs"][name] = res
            s = res["summary"]
            print(f"    {name:7s} median step {s['step_seconds']['median']:.2f} s, mean completion "
                  f"{s['mean_completion_length']:.1f} tokens, peak RSS {s['peak_rss_mib_train']:.0f} MiB "
                  f"(load {load:.1f} -> {res['loadavg_1min_after']:.1f})", file=sys.stderr)
    results["loadavg_end"], results["cpu_pressure_end"] = os.getloadavg(), cpu_pressure()
    results["comparison"] = compare(results["runs"])
    write_json(args.out, results)
    print_table(results)
    print(f"\nraw numbers: {args.out}", file=sys.stderr)
    if any(results["checks"].values()):
        sys.exit("some checks failed (see CHECK FAILED above): the two sides did not do the same work")


if __name__ == "__main__":
    main()
