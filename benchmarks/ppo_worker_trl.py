"""One TRL 1.12 `experimental.ppo.PPOTrainer` run in this process (.bench-venv-trl112).

Started by ppo_step.py; not meant to be run by hand. Does not import rlhf_cli.

Input: the plan JSON written by the driver: the policy directory (also loaded a second time as the
frozen reference, as TRL's own example script does), the reward-model directory (loaded twice: the
reward model and the value model's initialisation, as TRL's example does), the prompts already
rendered to token ids by *our* chat-template code (all of one length, so no batch is padded and
the order TRL's shuffling DataLoader draws them in changes no shape), and the knobs.

How the knobs map (ppo_trainer.py of trl 1.12.0): one PPO update ("step") samples
`per_device_train_batch_size * gradient_accumulation_steps` = batch prompts, then for each of
`num_ppo_epochs` epochs loops over `num_mini_batches` minibatches of batch / num_mini_batches rows,
and inside each over micro-batches of `per_device_train_batch_size` rows, calling
`optimizer.step()` under `accelerator.accumulate` (a real step only every
`gradient_accumulation_steps` micro-batches). With per_device_train_batch_size = batch,
gradient_accumulation_steps = 1 and num_mini_batches = batch / minibatch, the micro-batch slice
`mini_batch_inds[0:batch]` is the whole minibatch: one forward/backward over `minibatch` rows and
one optimizer step per minibatch, the same passes and steps as `rlhf ppo --minibatch-size`.
(The seemingly natural per_device = minibatch, grad-accum = batch / minibatch would make
accelerate step the optimizer once per *update*, not once per minibatch.)

Timing. PPOTrainer.train() is one monolithic loop, so the step clock is the trainer's own
`on_step_end` callback (called once per update, after the optimizer steps, the metrics and the lr
step): a step is the time from one `on_step_end` to the next (the first from `on_train_begin`).
Phases inside a step come from wrapping three module-level functions the loop calls by name:
`batch_generation` (sampling), `truncate_response` (marks the end of the no-grad rollout forwards
of the reference, value and reward models ... and lets us count each response's tokens) and
`forward` (its first call with grad enabled starts the PPO update). Per step:
  other    = previous step end -> sampling starts (the previous step's gc/cleanup, next batch)
  generate = batch_generation
  score    = sampling end -> first grad-enabled forward (ref log-probs, value + reward forwards,
             KL-shaped rewards, GAE loop, whitening)
  train    = first grad-enabled forward -> on_step_end (forward/backward/optimizer per minibatch,
             stats, logging, lr step)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, set_threads, versions, write_json  # noqa: E402

set_threads()  # before transformers pulls in torch's thread pool
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from transformers import TrainerCallback  # noqa: E402


class StepClock(TrainerCallback):
    """Per-update wall times and phase splits (see the module docstring)."""

    def __init__(self) -> None:
        self.marks: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.last_end = 0.0
        self.last_cpu = 0.0
        self.cpu_seconds: list[float] = []  # process CPU time per step: ~2x wall on a quiet machine
        self.rss_at_end: float | None = None
        self.checkpointing_active: bool | None = None
        self.response_tokens: list[list[int]] = []  # per step, per row: tokens up to and including EOS
        self.response_width: list[int] = []  # per step: decode steps (generated columns)
        self.eos_share: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs.get("model")
        policy = getattr(model, "policy", model)
        self.checkpointing_active = bool(getattr(policy, "is_gradient_checkpointing", False))
        self.last_end, self.last_cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        c, start = self.cur, self.last_end
        gen0, gen1 = c.get("gen0", start), c.get("gen1", start)
        train0 = c.get("train0", now)
        self.marks.append({"step_seconds": now - start, "other": gen0 - start, "generate": gen1 - gen0,
                           "score": train0 - gen1, "train": now - train0})
        cpu = time.process_time()
        self.cpu_seconds.append(cpu - self.last_cpu)
        self.cur, self.last_end, self.last_cpu = {}, now, cpu

    def on_train_end(self, args, state, control, **kwargs):
        self.rss_at_end = peak_rss_mib()


def instrument(ppo_mod, clock: StepClock, eos_id: int) -> None:
    """Wrap the loop's module-level helpers to stamp phases (ppo_trainer.train looks them up by name)."""
    import torch

    real_gen, real_forward, real_trunc = ppo_mod.batch_generation, ppo_mod.forward, ppo_mod.truncate_response

    def batch_generation(*a, **kw):
        clock.cur["gen0"] = time.perf_counter()
        out = real_gen(*a, **kw)
        clock.cur["gen1"] = time.perf_counter()
        return out

    def forward(*a, **kw):
        if torch.is_grad_enabled() and "train0" not in clock.cur:
            clock.cur["train0"] = time.perf_counter()
        return real_forward(*a, **kw)

    def truncate_response(stop_token_id, pad_token_id, responses):
        out = real_trunc(stop_token_id, pad_token_id, responses)
        # tokens up to and including the first EOS, else the whole generated width
        is_eos = responses == eos_id
        has = is_eos.any(1)
        first = torch.where(has, is_eos.int().argmax(1) + 1, torch.full_like(has, responses.shape[1], dtype=torch.long))
        clock.response_tokens.append([int(x) for x in first])
        clock.response_width.append(int(responses.shape[1]))
        clock.eos_share.append(float(has.float().mean()))
        return out

    ppo_mod.batch_generation, ppo_mod.forward, ppo_mod.truncate_response = batch_generation, forward, truncate_response


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--result", required=True, type=Path)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    plan = json.loads(args.plan.read_text())
    k, steps = plan["knobs"], plan["steps"]
    t_load = time.perf_counter()
    # the reward dir's tokenizer: the policy's, with a pad token distinct from EOS (TRL masks every
    # pad-id token as padding, so pad == EOS would hide the prompt's turn ends and the response's EOS)
    tok = AutoTokenizer.from_pretrained(plan["reward"], padding_side="left")
    assert tok.pad_token_id != tok.eos_token_id, "TRL needs a pad token distinct from EOS"
    f32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(plan["policy"], **f32)
    ref = AutoModelForCausalLM.from_pretrained(plan["policy"], **f32)
    reward = AutoModelForSequenceClassification.from_pretrained(plan["reward"], num_labels=1, **f32)
    value = AutoModelForSequenceClassification.from_pretrained(plan["reward"], num_labels=1, **f32)
    load_seconds = time.perf_counter() - t_load
    dataset = Dataset.from_dict({"input_ids": plan["prompt_ids"]})

    batch, minibatch = k["batch_size"], k["minibatch_size"]
    knobs = dict(
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=batch // minibatch,
        num_ppo_epochs=k["ppo_epochs"], total_episodes=steps * batch, local_rollout_forward_batch_size=batch,
        response_length=k["max_new_tokens"], temperature=k["temperature"], stop_token="eos",
        missing_eos_penalty=k["no_eos_penalty"], learning_rate=k["lr"], kl_coef=k["kl_coef"], kl_estimator="k1",
        cliprange=k["clip"], cliprange_value=k["clip_value"], vf_coef=k["vf_coef"], gamma=k["gamma"], lam=k["lam"],
        whiten_rewards=False, seed=k["seed"], num_sample_generations=0, lr_scheduler_type="constant",
        # fp32 on CPU: TRL's configs default to bf16=True, which stays on under use_cpu (BENCHMARKS.md)
        bf16=False, fp16=False, use_cpu=True, activation_checkpointing=False,
        dataloader_num_workers=0, dataloader_pin_memory=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )
    if batch % minibatch:
        sys.exit("batch must be a multiple of minibatch")
    out_dir = tempfile.mkdtemp(prefix="trl-ppo-")  # TRL wants one; saving is off, so it stays empty
    cfg = PPOConfig(output_dir=out_dir, **knobs)
    clock = StepClock()
    instrument(ppo_mod, clock, tok.eos_token_id)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[clock])
    opt_steps = [0]
    # the inner torch optimizer steps only on real (synced) steps, whatever accelerate's wrapper is asked
    trainer.optimizer.optimizer.register_step_post_hook(lambda *_: opt_steps.__setitem__(0, opt_steps[0] + 1))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    # on_step_end marks the *end* of a step; every step's count of generated tokens is complete
    write_json(args.result, {
        "side": "trl",
        "step_seconds": [m["step_seconds"] for m in clock.marks],
        "step_cpu_seconds": clock.cpu_seconds,
        "phases": {p: [m[p] for m in clock.marks] for p in ("other", "generate", "score", "train")},
        "response_tokens": clock.response_tokens, "response_width": clock.response_width, "eos_share": clock.eos_share,
        "optimizer_steps": opt_steps[0], "updates": len(clock.marks),
        "config": {"gradient_checkpointing": clock.checkpointing_active, "bf16": cfg.bf16,
                   "dtype": str(next(policy.parameters()).dtype), "torch_threads": torch.get_num_threads(),
                   "batch_size": cfg.batch_size, "mini_batch_size": cfg.mini_batch_size,
                   "per_device_train_batch_size": cfg.per_device_train_batch_size,
                   "num_mini_batches": cfg.num_mini_batches, "optim": str(cfg.optim),
                   "attn_implementation": policy.config._attn_implementation,
                   "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                   "ppo_config_overrides": knobs},
        "peak_rss_mib_train": clock.rss_at_end, "peak_rss_mib_exit": peak_rss_mib(),
        "load_seconds": load_seconds, "wall_seconds_train": wall,
        "versions": versions("torch", "transformers", "tokenizers", "accelerate", "datasets", "trl"),
    })


if __name__ == "__main__":
    main()
