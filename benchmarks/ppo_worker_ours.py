"""One `rlhf ppo` run in this process (project .venv): `rlhf_cli.commands.ppo.run(PpoConfig(...))`.

Started by ppo_step.py; not meant to be run by hand. The training loop runs unmodified; the worker
only wraps three functions the loop looks up by name at call time, to stamp the same phase
boundaries as ppo_worker_trl.py does on TRL's loop:
  rlhf_cli.rollout.collect      its start is a step boundary (a step = one collect start to the
                                next; the last ends where the final checkpoint save starts), and
                                its Rollout gives each response's token count (EOS included), the
                                EOS share and the decode width
  rlhf_cli.rollout.generate     sampling (inside collect)
  rlhf_cli.ppo_step.update      the PPO update (ppo_epochs x minibatches of forward/backward/step)
Per step: generate = sampling; score = sampling end -> update start (old log-probs + values +
reference forwards, the reward model, KL-shaped rewards, GAE, whitening); train = update;
other = the rest (prompt batch, metrics line, progress bar). The loop's own per-step clock
(metrics.jsonl `step_seconds`, which leaves out the metrics line) is kept beside it.

Peak RSS is read just before the final checkpoint is written (the peer saves nothing) and at exit.
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

    from rlhf_cli import ppo_step, rollout
    from rlhf_cli.commands import ppo
    from rlhf_cli.models import checkpoint

    plan = json.loads(args.plan.read_text())
    k, steps = plan["knobs"], plan["steps"]
    n_prompts = len(plan["prompt_ids"])

    starts: list[float] = []  # step boundaries
    cpu: list[float] = []  # process CPU time at each boundary
    marks: list[dict[str, float]] = []
    rows: dict[str, list] = {"response_tokens": [], "response_width": [], "eos_share": []}
    save: dict[str, float] = {}
    real_collect, real_generate, real_update, real_save = rollout.collect, rollout.generate, ppo_step.update, checkpoint.save_checkpoint

    def collect(*a, **kw):
        starts.append(time.perf_counter())
        cpu.append(time.process_time())
        marks.append({})
        ro = real_collect(*a, **kw)
        rows["response_tokens"].append([int(x) for x in ro.response_mask.sum(1)])
        rows["response_width"].append(int(ro.response.shape[1]))
        rows["eos_share"].append(float(ro.has_eos.float().mean()))
        return ro

    def generate(*a, **kw):
        marks[-1]["gen0"] = time.perf_counter()
        out = real_generate(*a, **kw)
        marks[-1]["gen1"] = time.perf_counter()
        return out

    def update(*a, **kw):
        marks[-1]["train0"] = time.perf_counter()
        out = real_update(*a, **kw)
        marks[-1]["train1"] = time.perf_counter()
        return out

    def save_checkpoint(*a, **kw):
        save["t"], save["cpu"], save["rss"] = time.perf_counter(), time.process_time(), peak_rss_mib()
        return real_save(*a, **kw)

    rollout.collect, rollout.generate, ppo_step.update, checkpoint.save_checkpoint = collect, generate, update, save_checkpoint
    opt_steps = [0]  # every optimizer's step(), process-wide (ppo.run builds one AdamW)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *_: opt_steps.__setitem__(0, opt_steps[0] + 1))

    from rlhf_cli.config import build

    cfg = build(
        ppo.PpoConfig, prompts=plan["prompts"], out=str(args.work / "ppo"), model=plan["policy"], reward=plan["reward"],
        format="chat", batch_size=k["batch_size"], minibatch_size=k["minibatch_size"], ppo_epochs=k["ppo_epochs"],
        epochs=math.ceil(steps * k["batch_size"] / n_prompts), max_steps=steps, max_new_tokens=k["max_new_tokens"],
        temperature=k["temperature"], lr=k["lr"], kl_coef=k["kl_coef"], kl_estimator="k1", gamma=k["gamma"],
        lam=k["lam"], clip=k["clip"], clip_value=k["clip_value"], vf_coef=k["vf_coef"],
        no_eos_penalty=k["no_eos_penalty"], value_init="reward", dtype="fp32", ref_dtype="fp32",
        gradient_checkpointing=False, save_every=0, seed=k["seed"], device="cpu",
    )
    t0 = time.perf_counter()
    final = ppo.run(cfg)
    wall = time.perf_counter() - t0

    ends = starts[1:] + [save.get("t", time.perf_counter())]
    phases: dict[str, list[float]] = {"other": [], "generate": [], "score": [], "train": []}
    for start, end, m in zip(starts, ends, marks, strict=True):
        phases["generate"].append(m["gen1"] - m["gen0"])
        phases["score"].append(m["train0"] - m["gen1"])
        phases["train"].append(m["train1"] - m["train0"])
        phases["other"].append((m["gen0"] - start) + (end - m["train1"]))
    metrics = [json.loads(line) for line in (args.work / "ppo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    write_json(args.result, {
        "side": "ours",
        "step_seconds": [e - s for s, e in zip(starts, ends, strict=True)],
        "step_cpu_seconds": [e - s for s, e in zip(cpu, cpu[1:] + [save.get("cpu", time.process_time())], strict=True)],
        "loop_step_seconds": [m["step_seconds"] for m in metrics],
        "loop_phases": {p: [m[f"time_{p}"] for m in metrics] for p in ("generate", "score", "train")},
        "phases": phases, **rows,
        "optimizer_steps": opt_steps[0], "updates": len(starts),
        "metrics_response_length": [m["response_length"] for m in metrics],
        "config": {"gradient_checkpointing": cfg.train.gradient_checkpointing, "dtype": cfg.train.dtype,
                   "torch_threads": torch.get_num_threads(), "max_grad_norm": cfg.train.max_grad_norm,
                   "ppo_config": asdict(cfg)},
        "final": final,
        "peak_rss_mib_train": save.get("rss"), "peak_rss_mib_exit": peak_rss_mib(),
        "wall_seconds_run": wall, "versions": versions("torch", "transformers", "tokenizers", "peft", "rlhf-cli"),
    })


if __name__ == "__main__":
    main()
