"""One `rlhf grpo` run in this process (project .venv): `rlhf_cli.commands.grpo.run(GrpoConfig(...))`.

Started by grpo_step.py; not meant to be run by hand. The training loop runs unmodified; the worker
only wraps three functions that `grpo.run` looks up by name at call time:
  rlhf_cli.training.set_lr        the first call of every loop iteration: a step boundary (a step is
                                  one set_lr call to the next; the last step ends where
                                  training.finish starts, i.e. before the final checkpoint is written)
  rlhf_cli.rollout.sample_groups  its GroupBatch gives each completion's token count (EOS included),
                                  the truncated flags, the decode width and the prompt ids (checked
                                  against the plan's)
  rlhf_cli.training.finish        end of the last step; peak RSS is read here (the peer saves nothing)
The generate / score / train split is the loop's own clock from metrics.jsonl (commands/grpo.py):
  time_generate = step start -> sampling done (set_lr, chunk seeds, KV-cached sampling of the B x K
                  completions with their log-probs + entropies, text decode, padding into a GroupBatch)
  time_score    = the judges (here the rule file, called once per completion) + reward statistics
  time_train    = group advantages + the update (forward with grad, DAPO loss, backward, grad clip,
                  AdamW step) + release_cache
  other         = the rest of the wall-clock step: the metrics line, the progress bar, maybe_save (off)
Every optimizer step is counted by a global torch hook; the driver checks it is one per step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, set_threads, versions, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path, help="scratch dir for the checkpoint")
    ap.add_argument("--result", required=True, type=Path)
    args = ap.parse_args()

    set_threads()
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from rlhf_cli import rollout, training
    from rlhf_cli.commands import grpo
    from rlhf_cli.config import build

    plan = json.loads(args.plan.read_text())
    k, steps = plan["knobs"], plan["steps"]
    plan_prompts = {tuple(ids) for ids in plan["prompt_ids"]}

    starts: list[float] = []  # step boundaries (wall)
    cpu: list[float] = []  # process CPU time at each boundary
    opt_at: list[int] = []  # optimizer steps so far, at each boundary
    rows: dict[str, list] = {"completion_tokens": [], "truncated": [], "decode_width": [], "sampling_calls": []}
    stop_ids: list[int] = []
    end: dict[str, float] = {}
    opt_steps = [0]
    unknown_prompts = [0]
    real_set_lr, real_sample, real_finish = training.set_lr, rollout.sample_groups, training.finish

    def set_lr(*a, **kw):
        starts.append(time.perf_counter())
        cpu.append(time.process_time())
        opt_at.append(opt_steps[0])
        rows["sampling_calls"].append(0)
        return real_set_lr(*a, **kw)

    def sample_groups(model, tok, chunks, *a, **kw):
        from rlhf_cli.generation import stop_token_ids

        stop_ids[:] = sorted(stop_token_ids(tok, model))  # what the decoder stops at (TRL: eos_token_ids)
        rows["sampling_calls"][-1] += len(chunks)
        unknown_prompts[0] += sum(tuple(p) not in plan_prompts for prompts, _ in chunks for p in prompts)
        b = real_sample(model, tok, chunks, *a, **kw)
        rows["completion_tokens"].append([int(x) for x in b.response_mask.sum(1)])
        rows["truncated"].append([bool(x) for x in b.truncated])
        rows["decode_width"].append(int(b.response.shape[1]))
        return b

    def finish(*a, **kw):
        end["t"], end["cpu"], end["rss"] = time.perf_counter(), time.process_time(), peak_rss_mib()
        end["opt"] = opt_steps[0]
        return real_finish(*a, **kw)

    # grpo.run imports sample_groups from rlhf_cli.rollout when it starts, so patch the module first
    training.set_lr, rollout.sample_groups, training.finish = set_lr, sample_groups, finish
    register_optimizer_step_post_hook(lambda *_: opt_steps.__setitem__(0, opt_steps[0] + 1))

    n_prompts = len(plan["prompt_ids"])
    cfg = build(
        grpo.GrpoConfig, prompts=plan["prompts"], out=str(args.work / "grpo"), model=plan["policy"],
        judge=(f"rule:{plan['reward_file']}:{plan['reward_fn_ours']}",), format="chat",
        batch_size=k["prompts_per_step"], group_size=k["group_size"], minibatch_size=0, iterations=k["num_iterations"],
        generate_batch=0, max_new_tokens=k["max_completion_length"], temperature=k["temperature"], top_p=1.0,
        advantage="grpo", scale_rewards=k["scale_rewards"], loss=k["loss_type"], importance_sampling="token",
        clip=k["clip"], clip_high=None, beta=k["beta"], lr=k["lr"], schedule="constant", warmup=0.0,
        max_grad_norm=k["max_grad_norm"], weight_decay=0.0, grad_accum=1,
        epochs=math.ceil(steps * k["prompts_per_step"] / n_prompts), max_steps=steps,
        dtype="fp32", gradient_checkpointing=False, save_every=0, seed=k["seed"], device="cpu",
    )
    t0 = time.perf_counter()
    final = grpo.run(cfg)
    wall = time.perf_counter() - t0

    ends = starts[1:] + [end.get("t", time.perf_counter())]
    metrics = [json.loads(line) for line in (args.work / "grpo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_seconds = [e - s for s, e in zip(starts, ends, strict=True)]
    phases = {p: [m[f"time_{p}"] for m in metrics] for p in ("generate", "score", "train")}
    phases["other"] = [s - sum(phases[p][i] for p in ("generate", "score", "train")) for i, s in enumerate(step_seconds)]
    write_json(args.result, {
        "side": "ours",
        "step_seconds": step_seconds,
        "step_cpu_seconds": [e - s for s, e in zip(cpu, cpu[1:] + [end.get("cpu", time.process_time())], strict=True)],
        "loop_step_seconds": [m["step_seconds"] for m in metrics],
        "phases": phases,
        **rows,
        "reward_mean": [m["reward"] for m in metrics],
        "optimizer_steps_per_step": [b - a for a, b in zip(opt_at, opt_at[1:] + [end.get("opt", opt_steps[0])], strict=True)],
        "optimizer_steps": opt_steps[0], "steps": len(starts),
        "prompts_not_in_plan": unknown_prompts[0],
        "metrics_completion_length": [m["completion_length"] for m in metrics],
        "metrics_clipped_ratio": [m["clipped_ratio"] for m in metrics],
        "config": {"gradient_checkpointing": cfg.train.gradient_checkpointing, "dtype": cfg.train.dtype,
                   "torch_threads": torch.get_num_threads(), "stop_token_ids": stop_ids, "grpo_config": asdict(cfg)},
        "final": final,
        "peak_rss_mib_train": end.get("rss"), "peak_rss_mib_exit": peak_rss_mib(),
        "wall_seconds_run": wall, "versions": versions("torch", "transformers", "tokenizers", "rlhf-cli"),
    })


if __name__ == "__main__":
    main()
