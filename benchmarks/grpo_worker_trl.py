"""One TRL 1.16 `GRPOTrainer` run in this process (.bench-venv), transformers generation (no vLLM).

Started by grpo_step.py; not meant to be run by hand. Does not import rlhf_cli.

Input: the plan JSON written by the driver: the policy directory, the prompts as conversations
[{"role": "user", "content": text}] (TRL renders them with apply_chat_template; the worker checks that
every prompt it generates from has exactly the token ids our renderer gave in the plan), the reward
file (the same Python function ours calls through `--judge rule:FILE.py:FN`), and the knobs.

How the knobs map (grpo_config.py / grpo_trainer.py of trl 1.16.0). GRPOConfig.__post_init__ with
steps_per_generation=1 sets generation_batch_size = per_device_train_batch_size x processes x 1 = 16
completions = 4 prompts x num_generations 4; the RepeatSampler hands _prepare_inputs one generation
batch per optimizer step, and `generate_every = steps_per_generation x num_iterations = 1`, so every
training_step generates and scores anew and the batch is used once. gradient_accumulation_steps=1:
one forward/backward over the 16 completions, then one optimizer step (Trainer's inner loop). Because
gradient_accumulation_steps % generate_every == 0, TRL skips its no-grad "old log-probs" forward
and takes per_token_logps.detach() as the old policy (ratio 1), as ours takes the sampler's; the
worker checks that `old_per_token_logps` is absent. beta=0: no reference model is created. dapo
normalises by num_items_in_batch, the generation batch's completion tokens (= ours, the step's tokens).
Checked, not assumed: a global torch optimizer-step hook counts real optimizer steps, and the
wrappers count generation batches; the driver requires exactly one of each per training step.

Timing. Trainer.train() is one monolithic loop, so the step clock is the `on_step_end` callback
(after backward, grad clipping, optimizer.step, scheduler.step, zero_grad): a step is the time from
one on_step_end to the next (the first from on_train_begin). Inside a step, wrappers around the
trainer's own methods (each called through `self.`, so an instance attribute replaces it) stamp:
  other    = step start -> _generate_and_score_completions starts (the dataloader fetching the next
             generation batch, Trainer bookkeeping, callbacks)
  generate = _generate: apply_chat_template tokenisation of the 4 x 4 prompts, model.generate
             (left-padded batch of 16, KV cache, sampling), cut after the first EOS, batch_decode,
             length metrics; `sampling` is model.generate alone (_generate_single_turn)
  score    = _generate returns -> _generate_and_score_completions returns: padding to tensors,
             _calculate_rewards (the reward function; timed alone as `reward`), group advantages,
             reward metrics
  train    = _generate_and_score_completions returns -> on_step_end: shuffle/split of the batch,
             compute_loss (forward with the fused log-prob head, entropy, DAPO loss), backward,
             grad-norm clip, AdamW step, lr scheduler step
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, set_threads, versions, write_json  # noqa: E402

set_threads()  # before transformers pulls in torch's thread pool
from transformers import TrainerCallback  # noqa: E402


class StepClock(TrainerCallback):
    """Per-step wall/CPU times and phase splits (see the module docstring)."""

    def __init__(self, opt_steps: list[int]) -> None:
        self.opt_steps = opt_steps
        self.marks: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.last_end = 0.0
        self.last_cpu = 0.0
        self.last_opt = 0
        self.cpu_seconds: list[float] = []
        self.opt_per_step: list[int] = []
        self.gen_calls_per_step: list[int] = []
        self.rss_at_end: float | None = None
        self.checkpointing_active: bool | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs.get("model")  # the ground truth, whatever the config said
        self.checkpointing_active = bool(getattr(model, "is_activation_checkpointing", False))
        self.last_end, self.last_cpu, self.last_opt = time.perf_counter(), time.process_time(), self.opt_steps[0]

    def on_step_end(self, args, state, control, **kwargs):
        now, c, start = time.perf_counter(), self.cur, self.last_end
        gs0, gs1 = c.get("gs0", start), c.get("gs1", start)
        gen0, gen1 = c.get("gen0", gs0), c.get("gen1", gs0)
        self.marks.append({"step_seconds": now - start, "other": gs0 - start, "generate": gen1 - gen0,
                           "score": gs1 - gen1, "train": now - gs1, "sampling": c.get("sampling", 0.0),
                           "reward": c.get("reward", 0.0)})
        cpu = time.process_time()
        self.cpu_seconds.append(cpu - self.last_cpu)
        self.opt_per_step.append(self.opt_steps[0] - self.last_opt)
        self.gen_calls_per_step.append(int(c.get("gen_calls", 0)))
        self.cur, self.last_end, self.last_cpu, self.last_opt = {}, now, cpu, self.opt_steps[0]

    def on_train_end(self, args, state, control, **kwargs):
        self.rss_at_end = peak_rss_mib()


def instrument(trainer, clock: StepClock, plan_prompts: set[tuple[int, ...]], rec: dict[str, list]) -> None:
    """Wrap the trainer's generation, reward and scoring methods (see the module docstring)."""
    real_gs, real_gen = trainer._generate_and_score_completions, trainer._generate
    real_single, real_rewards = trainer._generate_single_turn, trainer._calculate_rewards
    ends = {*trainer.eos_token_ids, trainer._tokenizer.pad_token_id}

    def generate_and_score(inputs):
        clock.cur["gs0"] = time.perf_counter()
        clock.cur["gen_calls"] = clock.cur.get("gen_calls", 0) + 1
        out = real_gs(inputs)
        clock.cur["gs1"] = time.perf_counter()
        rec["old_logps_forward"].append("old_per_token_logps" in out)
        rec["rows_per_generation"].append(int(out["completion_ids"].shape[0]))
        return out

    def generate(prompts):
        clock.cur["gen0"] = time.perf_counter()
        out = real_gen(prompts)
        clock.cur["gen1"] = time.perf_counter()
        prompt_ids, completion_ids = out[0], out[1]
        rec["prompts_not_in_plan"].append(sum(tuple(p) not in plan_prompts for p in prompt_ids))
        rec["completion_tokens"].append([len(c) for c in completion_ids])
        # TRL's own rule (grpo_trainer.py _generate): truncated = the last token is neither EOS nor pad
        rec["truncated"].append([bool(c) and c[-1] not in ends for c in completion_ids])
        rec["decode_width"].append(max(len(c) for c in completion_ids))
        return out

    def generate_single_turn(*a, **kw):
        t = time.perf_counter()
        out = real_single(*a, **kw)
        clock.cur["sampling"] = clock.cur.get("sampling", 0.0) + time.perf_counter() - t
        return out

    def calculate_rewards(*a, **kw):
        t = time.perf_counter()
        out = real_rewards(*a, **kw)
        clock.cur["reward"] = clock.cur.get("reward", 0.0) + time.perf_counter() - t
        rec["reward_mean"].append(float(out.nanmean()))
        return out

    trainer._generate_and_score_completions, trainer._generate = generate_and_score, generate
    trainer._generate_single_turn, trainer._calculate_rewards = generate_single_turn, calculate_rewards


def load_reward(path: str, name: str):
    spec = importlib.util.spec_from_file_location("bench_reward", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--result", required=True, type=Path)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    plan = json.loads(args.plan.read_text())
    k, steps = plan["knobs"], plan["steps"]
    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(plan["policy"])
    policy = AutoModelForCausalLM.from_pretrained(plan["policy"], dtype=torch.float32)
    load_seconds = time.perf_counter() - t_load
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in plan["texts"]]})
    reward_fn = load_reward(plan["reward_file"], plan["reward_fn_trl"])

    knobs = dict(
        # one generation batch of prompts_per_step x K completions per optimizer step (module docstring)
        per_device_train_batch_size=k["prompts_per_step"] * k["group_size"], gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=k["group_size"], num_iterations=k["num_iterations"],
        max_steps=steps, max_completion_length=k["max_completion_length"],
        temperature=k["temperature"], top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, use_vllm=False,
        loss_type=k["loss_type"], beta=k["beta"], epsilon=k["clip"], epsilon_high=None, scale_rewards=k["scale_rewards"],
        importance_sampling_level="token", mask_truncated_completions=False,
        learning_rate=k["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=k["max_grad_norm"], seed=k["seed"], disable_dropout=True,
        # fp32 on CPU: TRL's configs default to bf16=True, which stays on under use_cpu (BENCHMARKS.md);
        # gradient checkpointing off (TRL's default is on; activation_checkpointing is the non-deprecated name)
        bf16=False, fp16=False, use_cpu=True, activation_checkpointing=False,
        dataloader_num_workers=0, dataloader_pin_memory=False, log_completions=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )
    out_dir = tempfile.mkdtemp(prefix="trl-grpo-")  # TRL wants one; saving is off, so it stays empty
    cfg = GRPOConfig(output_dir=out_dir, **knobs)
    opt_steps = [0]  # every torch optimizer step() in the process (the Trainer builds its AdamW inside train())
    register_optimizer_step_post_hook(lambda *_: opt_steps.__setitem__(0, opt_steps[0] + 1))
    clock = StepClock(opt_steps)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward_fn], args=cfg, train_dataset=dataset,
                          processing_class=tok, callbacks=[clock])
    rec: dict[str, list] = {"completion_tokens": [], "truncated": [], "decode_width": [], "prompts_not_in_plan": [],
                            "old_logps_forward": [], "rows_per_generation": [], "reward_mean": []}
    instrument(trainer, clock, {tuple(ids) for ids in plan["prompt_ids"]}, rec)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    write_json(args.result, {
        "side": "trl",
        "step_seconds": [m["step_seconds"] for m in clock.marks],
        "step_cpu_seconds": clock.cpu_seconds,
        "phases": {p: [m[p] for m in clock.marks] for p in ("other", "generate", "score", "train", "sampling", "reward")},
        "completion_tokens": rec["completion_tokens"], "truncated": rec["truncated"], "decode_width": rec["decode_width"],
        "reward_mean": rec["reward_mean"],
        "optimizer_steps_per_step": clock.opt_per_step, "generations_per_step": clock.gen_calls_per_step,
        "optimizer_steps": opt_steps[0], "steps": len(clock.marks),
        "prompts_not_in_plan": sum(rec["prompts_not_in_plan"]),
        "old_logps_forward": any(rec["old_logps_forward"]), "rows_per_generation": rec["rows_per_generation"],
        "config": {"gradient_checkpointing": clock.checkpointing_active, "bf16": cfg.bf16,
                   "dtype": str(next(policy.parameters()).dtype), "torch_threads": torch.get_num_threads(),
                   "generation_batch_size": cfg.generation_batch_size, "steps_per_generation": cfg.steps_per_generation,
                   "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "optim": str(cfg.optim),
                   "ref_model": trainer.ref_model is not None, "attn_implementation": policy.config._attn_implementation,
                   "eos_token_ids": list(trainer.eos_token_ids), "pad_token_id": tok.pad_token_id,
                   "reward_funcs": trainer.reward_func_names, "grpo_config_overrides": knobs},
        "peak_rss_mib_train": clock.rss_at_end, "peak_rss_mib_exit": peak_rss_mib(),
        "load_seconds": load_seconds, "wall_seconds_train": wall,
        "versions": versions("torch", "transformers", "tokenizers", "accelerate", "datasets", "trl"),
    })


if __name__ == "__main__":
    main()
