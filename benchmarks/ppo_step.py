"""PPO step time: `rlhf ppo` vs TRL 1.12.0 `experimental.ppo.PPOTrainer`, same model and settings, CPU.

    .venv/bin/python benchmarks/ppo_step.py                       # SmolLM2-135M, 8 steps per side (~5 min)
    .venv/bin/python benchmarks/ppo_step.py --model builtin-tiny --steps 4 --warmup 1   # smoke test (~1 min)
    .venv/bin/python benchmarks/ppo_step.py --sides trl,ours,trl,ours   # repeats, stored as SIDE-2
    .venv/bin/python benchmarks/ppo_step.py --sides trl,ours,trlmalloc  # + TRL with rlhf's glibc malloc settings

TRL's PPOTrainer left TRL in 1.13.0, so the peer is pinned to trl==1.12.0 in its own venv,
.bench-venv-trl112 (torch 2.13.0, transformers 5.24.0: run_all.sh builds it).

Same work on both sides (/work/shared/BENCHMARKS.md):
  * models: the policy (SmolLM2-135M-Instruct from prepare_model.py, or --model builtin-tiny, our
    0.8M-parameter Llama saved as an HF dir), the frozen reference = a second copy of the policy,
    and one reward model built once from the policy by our `load_reward_model` (sequence
    classification, num_labels=1, our seeded head init, a pad token distinct from EOS) and saved
    under benchmarks/.models/<model>-rm with an rlhf.json manifest (reward_mean 0, reward_std 1, so
    our reward normalisation is the identity, as TRL has none). Both value models start from it.
  * prompts: 64 Alpaca instructions rendered by *our* chat-template code (checked equal to
    `apply_chat_template(tokenize=True)`), all of the same token length, so no batch is padded and
    the order each side draws them in changes no tensor shape;
  * fp32, no gradient checkpointing, 2 threads; per step 8 prompts x 1 completion, at most 32 new
    tokens, temperature 1.0 (TRL's default is 0.7), top-k/top-p off, stop at EOS (TRL stop_token
    "eos"), missing-EOS penalty 1.0 on both; 1 PPO epoch over minibatches of 4 rows: 2 forward /
    backward passes and 2 optimizer steps per step on both sides (the TRL knob mapping is explained
    in ppo_worker_trl.py and checked: the worker counts TRL's real optimizer steps); lr 1e-6
    constant, kl_coef 0.05 (k1), clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95.
  * each side in its own process, one after the other (ours in .venv, TRL in .bench-venv-trl112);
    the first --warmup steps are dropped, min/median/max over the rest; the 1-minute load average
    is recorded before and after each side.

Differences that stay (each side's own design, not knobs): the two sides sample different tokens, so
their responses differ in length: the mean response length and the EOS share are reported per side
(TRL's generate, like our decoder, keeps decoding until every row of the batch has stopped, so the
decode steps per step are reported too). TRL does not clip gradients in its PPO loop; ours clips to
max_grad_norm 1.0 (a little more work on our side). Both take the rollout's old log-probs from the
sampler (TRL from its scores, ours from the decoder's own log-softmax).

Raw numbers: benchmarks/results/ppo_step.json; worker logs: benchmarks/results/ppo_<side>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, OURS_PY, RESULTS, ROOT, cpu_info, run_worker, summarize, versions, write_json  # noqa: E402
from prepare_model import DEFAULT_OUT as SMOLLM_DIR  # noqa: E402
from prepare_model import prepare  # noqa: E402

PEER112_PY = ROOT / ".bench-venv-trl112" / "bin" / "python"
MALLOC_TUNED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"}
ALPACA = Path(os.environ.get("RLHF_BENCH_ALPACA", "/work/shared/data/stanford_alpaca/alpaca_5000.json"))
MODELS = HERE / ".models"
KNOBS = {"batch_size": 8, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 32, "temperature": 1.0,
         "lr": 1e-6, "kl_coef": 0.05, "no_eos_penalty": 1.0, "clip": 0.2, "clip_value": 0.2, "vf_coef": 0.1,
         "gamma": 1.0, "lam": 0.95, "seed": 0}
PHASES = ("generate", "score", "train", "other")


# ---------------------------------------------------------------- models and prompts (project .venv)


def policy_dir(name: str) -> Path:
    """SmolLM2-135M (prepare_model.py) or builtin:tiny saved once as a plain HF directory."""
    if name == "smollm2-135m":
        return prepare(SMOLLM_DIR)
    out = MODELS / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec("builtin:" + name.removeprefix("builtin-"))
    tok = load_tokenizer(spec)
    model = load_model(spec, tok, "fp32")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    print(f"wrote {out}", file=sys.stderr)
    return out


def reward_dir(policy: Path) -> Path:
    """The policy turned into a reward model by our own code (fresh seeded head, distinct pad), once."""
    out = MODELS / f"{policy.name}-rm"
    if (out / "rlhf.json").is_file() and (out / "model.safetensors").is_file():
        print(f"reward model ready: {out}", file=sys.stderr)
        return out
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec
    from rlhf_cli.models.reward import load_reward_model

    spec = parse_model_spec(str(policy))
    tok = load_tokenizer(spec)
    model = load_reward_model(spec, tok)  # sets a pad token distinct from EOS on tok
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # reward_mean 0 / std 1: our PPO's reward normalisation becomes the identity (TRL normalises nothing)
    manifest = {"step": "benchmark", "config": {"model": str(policy)}, "metrics": {"reward_mean": 0.0, "reward_std": 1.0}}
    (tmp / "rlhf.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {out}", file=sys.stderr)
    return out


def pick_prompts(policy: Path, n: int) -> tuple[list[str], list[list[int]]]:
    """The first n Alpaca instructions (no input field) whose rendered prompt has the most common length."""
    from rlhf_cli.data.records import render_prompt
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    if not ALPACA.is_file():
        sys.exit(f"benchmark data missing: {ALPACA}\n  set RLHF_BENCH_ALPACA=/path/to/alpaca_5000.json")
    tok = load_tokenizer(parse_model_spec(str(policy)))
    rows = [r["instruction"] for r in json.loads(ALPACA.read_text()) if not r.get("input")]
    rendered = [(text, render_prompt(tok, text, None, "chat")) for text in rows]
    length, count = Counter(len(ids) for _, ids in rendered).most_common(1)[0]
    if count < n:
        sys.exit(f"only {count} prompts of the most common length {length}: lower --prompts")
    chosen = [(t, ids) for t, ids in rendered if len(ids) == length][:n]
    for text, ids in chosen:  # TRL users tokenize with the template directly: the same ids
        hf = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
        hf = hf["input_ids"] if hasattr(hf, "keys") else hf
        if list(hf) != ids:
            sys.exit(f"our rendering differs from apply_chat_template for {text!r}")
    return [t for t, _ in chosen], [ids for _, ids in chosen]


# ---------------------------------------------------------------- analysis


def cpu_pressure() -> dict[str, float] | None:
    """Linux PSI: % of time some runnable task waited for a CPU (avg10/avg60); other people's jobs show here."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return {k: float(v) for k, v in (f.split("=") for f in line.split()[1:]) if k in ("avg10", "avg60")}


def analyse(res: dict, warmup: int) -> dict:
    secs = res["step_seconds"][warmup:]
    toks = [sum(r) for r in res["response_tokens"][warmup:]]
    rows = [len(r) for r in res["response_tokens"][warmup:]]
    cpu = res.get("step_cpu_seconds", [])[warmup:]
    # a quiet machine gives ~2 CPU-seconds per wall second (2 threads); much less means someone else had the cores
    util = [c / s for c, s in zip(cpu, secs, strict=False)]
    out = {
        "step_seconds": summarize(secs),
        "cpu_seconds_per_wall_second": summarize(util),
        "steps_below_1_6_cpus": sum(u < 1.6 for u in util),
        # the steps that had both cores (>= 1.8 CPU-s per s): a fallback view of a partly contended run
        "step_seconds_quiet_steps": summarize([s for s, u in zip(secs, util, strict=False) if u >= 1.8]),
        "phase_seconds_median": {p: summarize(res["phases"][p][warmup:]).get("median") for p in PHASES if p in res["phases"]},
        "phase_share_of_total": {p: sum(res["phases"][p][warmup:]) / sum(secs) for p in PHASES if p in res["phases"]},
        "response_tokens_per_step": summarize([float(t) for t in toks]),
        "mean_response_length": sum(toks) / max(1, sum(rows)),
        "eos_share": sum(res["eos_share"][warmup:]) / max(1, len(res["eos_share"][warmup:])),
        "decode_steps_per_step": summarize([float(w) for w in res["response_width"][warmup:]]) if res.get("response_width") else None,
        "response_tokens_per_s": sum(toks) / sum(secs),
        "peak_rss_mib_train": res["peak_rss_mib_train"], "peak_rss_mib_exit": res["peak_rss_mib_exit"],
        "optimizer_steps_per_update": res["optimizer_steps"] / res["updates"] if res.get("optimizer_steps") is not None else None,
    }
    return out


def compare(runs: dict) -> dict:
    best = {}
    for side in ("ours", "trl"):
        meds = [r["summary"]["step_seconds"]["median"] for name, r in runs.items() if name.split("-")[0] == side]
        if meds:
            best[side] = min(meds)
    if len(best) < 2:
        return {}
    o, t = runs["ours"]["summary"], runs["trl"]["summary"]
    contended = any(r["summary"]["cpu_seconds_per_wall_second"].get("median", 0.0) < 1.6 for r in runs.values())
    oq, tq = o["step_seconds_quiet_steps"], t["step_seconds_quiet_steps"]
    return {
        "contended": contended,
        "speedup_median_quiet_steps": tq["median"] / oq["median"] if oq.get("n") and tq.get("n") else None,
        "speedup_median_step": t["step_seconds"]["median"] / o["step_seconds"]["median"],
        "speedup_best_run_median_step": best["trl"] / best["ours"],
        # the sides sample different tokens: the same ratio per generated response token
        "speedup_response_tokens_per_s": o["response_tokens_per_s"] / t["response_tokens_per_s"],
        "rss_ours_over_trl": o["peak_rss_mib_train"] / t["peak_rss_mib_train"],
        "goal": ">= 1.15x TRL 1.12.0 PPOTrainer (median step time) with peak RSS <= TRL's",
        # not judged on a contended run: rerun on a quiet machine
        "goal_met": None if contended else (t["step_seconds"]["median"] / o["step_seconds"]["median"] >= 1.15
                                            and o["peak_rss_mib_train"] <= t["peak_rss_mib_train"]),
    }


def print_table(results: dict) -> None:
    env, st = results["env"], results["settings"]
    print(f"CPU: {env['cpu']['model']}  ({env['cpu']['affinity']} usable CPUs)  flags: {' '.join(env['cpu']['simd_flags'])}")
    for name, r in results["runs"].items():
        v = r["versions"]
        extra = f", trl {v['trl']}, accelerate {v.get('accelerate')}" if "trl" in v else f", rlhf-cli {v.get('rlhf-cli')}"
        print(f"{name}: torch {v['torch']}, transformers {v['transformers']}{extra}")
    k = results["knobs"]
    print(f"{results['model']} fp32; {k['batch_size']} prompts x 1 completion per step, <= {k['max_new_tokens']} new tokens, "
          f"T={k['temperature']}, minibatch {k['minibatch_size']}, {k['ppo_epochs']} PPO epoch; prompt length "
          f"{results['prompt_length']} tokens; {st['steps'] - st['warmup']} measured steps after {st['warmup']} warm-up\n")
    hdr = (f"{'side':7s} {'step s median':>13s} {'min':>6s} {'max':>6s} {'generate':>8s} {'score':>6s} {'train':>6s} "
           f"{'other':>6s} {'resp len':>8s} {'EOS':>5s} {'decode':>6s} {'peak RSS MiB':>12s} {'CPUs busy':>9s} {'load before/after':>17s}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in results["runs"].items():
        s, ph = r["summary"], r["summary"]["phase_seconds_median"]
        dec = s["decode_steps_per_step"]["median"] if s.get("decode_steps_per_step") else float("nan")
        print(f"{name:7s} {s['step_seconds']['median']:13.2f} {s['step_seconds']['min']:6.2f} {s['step_seconds']['max']:6.2f} "
              f"{ph.get('generate', float('nan')):8.2f} {ph.get('score', float('nan')):6.2f} {ph.get('train', float('nan')):6.2f} "
              f"{ph.get('other', float('nan')):6.2f} {s['mean_response_length']:8.1f} {s['eos_share']:5.2f} {dec:6.0f} "
              f"{s['peak_rss_mib_train']:12.0f} {s['cpu_seconds_per_wall_second'].get('median', float('nan')):9.2f} "
              f"{r['loadavg_1min_before']:8.1f}/{r['loadavg_1min_after']:<8.1f}")
    busy = {n: r["summary"]["cpu_seconds_per_wall_second"].get("median", 0.0) for n, r in results["runs"].items()}
    if any(b < 1.6 for b in busy.values()):
        print(f"WARNING: contended run (CPUs busy {busy}): other jobs shared the cores; rerun on a quiet machine")
    c = results["comparison"]
    if c:
        print(f"\nours vs TRL: {c['speedup_median_step']:.2f}x (median step time; best run of each side "
              f"{c['speedup_best_run_median_step']:.2f}x; per response token {c['speedup_response_tokens_per_s']:.2f}x); "
              f"peak RSS ours/TRL {c['rss_ours_over_trl']:.2f}")
        verdict = {None: "not judged (contended run)", True: "MET", False: "missed"}[c["goal_met"]]
        q = c["speedup_median_quiet_steps"]
        print(f"goal {c['goal']}: {verdict}" + (f"; over the uncontended steps only: {q:.2f}x" if q else ""))
    print("CPUs busy = median process CPU-seconds per wall second over the measured steps (2.0 = both cores ours; "
          "lower = contended: rerun)")
    print("phases are medians in seconds: generate = sampling, score = no-grad rollout forwards (old/ref log-probs, "
          "values, reward) + advantages, train = PPO update(s), other = the rest of the step")


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "builtin-tiny", "builtin-small"))
    ap.add_argument("--steps", type=int, default=8, help="PPO steps per side (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--sides", default="trl,ours", help="comma list run in order; a repeated side is stored as SIDE-2")
    ap.add_argument("--out", type=Path, default=RESULTS / "ppo_step.json")
    args = ap.parse_args()
    if args.steps - args.warmup < 1:
        sys.exit("--steps must exceed --warmup")
    sides = args.sides.split(",")
    if {"trl", "trlmalloc"} & set(sides) and not PEER112_PY.exists():
        sys.exit(f"{PEER112_PY} missing: build .bench-venv-trl112 (torch==2.13.0 trl==1.12.0 transformers==5.24.0), "
                 "see benchmarks/run_all.sh")

    policy = policy_dir(args.model)
    rm = reward_dir(policy)
    texts, prompt_ids = pick_prompts(policy, args.prompts)
    results: dict = {
        "benchmark": "ppo_step", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": str(policy.relative_to(ROOT)), "reward_model": str(rm.relative_to(ROOT)), "knobs": KNOBS,
        "prompt_length": len(prompt_ids[0]), "n_prompts": len(prompt_ids),
        "env": {"cpu": cpu_info(), "ours_versions": versions("torch", "transformers", "tokenizers", "rlhf-cli")},
        "loadavg_start": os.getloadavg(), "cpu_pressure_start": cpu_pressure(), "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-ppo-") as tmp_s:
        tmp = Path(tmp_s)
        prompts_path = tmp / "prompts.jsonl"
        prompts_path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        plan = {"policy": str(policy), "reward": str(rm), "prompts": str(prompts_path), "prompt_ids": prompt_ids,
                "steps": args.steps, "knobs": KNOBS}
        plan_path = tmp / "plan.json"
        plan_path.write_text(json.dumps(plan))
        print(f"{len(texts)} prompts of {len(prompt_ids[0])} tokens; policy {policy}, reward {rm}", file=sys.stderr)
        for i, side in enumerate(sides):
            name = side if side not in results["runs"] else f"{side}-2"
            res_path = tmp / f"{side}-{i}.json"
            if side == "ours":
                cmd = [str(OURS_PY), str(HERE / "ppo_worker_ours.py"), "--plan", str(plan_path), "--work",
                       str(tmp / f"work-{i}"), "--result", str(res_path)]
            elif side in ("trl", "trlmalloc"):
                cmd = [str(PEER112_PY), str(HERE / "ppo_worker_trl.py"), "--plan", str(plan_path), "--result", str(res_path)]
            else:
                sys.exit(f"unknown side {side!r}")
            psi = cpu_pressure()
            # trlmalloc: TRL with the glibc malloc settings `rlhf` applies to itself (runtime.keep_freed_memory)
            load = run_worker(cmd, RESULTS / f"ppo_{name}.log", env=MALLOC_TUNED if side == "trlmalloc" else None)
            res = json.loads(res_path.read_text())
            res["loadavg_1min_before"], res["loadavg_1min_after"] = load, os.getloadavg()[0]
            res["cpu_pressure_before"], res["cpu_pressure_after"] = psi, cpu_pressure()
            if len(res["step_seconds"]) < args.steps:
                sys.exit(f"{side}: only {len(res['step_seconds'])} steps recorded, expected {args.steps}")
            res["summary"] = analyse(res, args.warmup)
            results["runs"][name] = res
            s = res["summary"]
            print(f"    {name:7s} median step {s['step_seconds']['median']:.2f} s, mean response "
                  f"{s['mean_response_length']:.1f} tokens, peak RSS {s['peak_rss_mib_train']:.0f} MiB "
                  f"(load {load:.1f} -> {res['loadavg_1min_after']:.1f})", file=sys.stderr)
    results["loadavg_end"], results["cpu_pressure_end"] = os.getloadavg(), cpu_pressure()
    results["comparison"] = compare(results["runs"])
    write_json(args.out, results)
    print_table(results)
    print(f"\nraw numbers: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
