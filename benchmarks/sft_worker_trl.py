"""One TRL `SFTTrainer` run in this process (.bench-venv), on pre-tokenized microbatches.

Started by sft_throughput.py; not meant to be run by hand. Does not import rlhf_cli.

Input: a plan JSON written by the driver with our tokenizer + masks + packer, one dataset row per
row of our microbatches, in order:
  packing on   {"input_ids", "labels", "seq_lengths"}  (one row = several examples end to end)
  packing off  {"input_ids", "labels"}                 (one row = one example)
`labels` are the token id where our loss mask is 1, else -100. TRL 1.16 leaves a dataset that
already has `input_ids` and `labels` as is (SFTTrainer._prepare_dataset: `is_processed`, and "A
dataset that already provides a 'labels' column is left as is"), and its
DataCollatorForLanguageModeling turns `seq_lengths` into restarting position_ids in padding-free
mode. With `train_sampling_strategy="sequential"` and `shuffle_dataset=False`, TRL's step i sees
exactly our microbatch i.

Timing: a TrainerCallback stamps on_step_begin / on_step_end (forward, backward, clip, optimizer
and scheduler step; the batch was already collated by then) and, as a second number, the time
from one on_step_end to the next (adds data loading/collation and the trainer's bookkeeping).
Non-padding tokens are counted from each collated batch by wrapping the trainer's collator.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, set_threads, versions, write_json  # noqa: E402

set_threads()  # before transformers pulls in torch's thread pool
from transformers import TrainerCallback  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--trl-defaults", action="store_true",
                    help="leave gradient_checkpointing at TRL's default (True) instead of matching ours (off)")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    plan = json.loads(args.plan.read_text())
    packing, batch_size, steps = plan["packing"], plan["batch_size"], plan["steps"]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = Dataset.from_list(plan["rows"])

    knobs = dict(
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        seed=0,
        # fp32 on CPU: SFTConfig defaults to bf16=True, which stays on under use_cpu (BENCHMARKS.md)
        bf16=False, fp16=False, use_cpu=True,
        # same microbatches in the same order as ours
        train_sampling_strategy="sequential", shuffle_dataset=False,
        # ours packs before training (best-fit decreasing) -> TRL gets packed rows + seq_lengths and
        # runs padding-free; unpacked -> classic right padding + attention mask on both sides.
        # TRL raises if padding_free without packing has a max_length, so rows come pre-truncated.
        packing=False, padding_free=packing, max_length=None if packing else plan["max_len"],
        dataloader_num_workers=0, dataloader_pin_memory=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )
    if not args.trl_defaults:
        # SFTConfig's `gradient_checkpointing=True` default is, in transformers 5.24, a deprecated alias
        # of `activation_checkpointing`; setting the new name wins over the alias.
        knobs["activation_checkpointing"] = False
    out_dir = tempfile.mkdtemp(prefix="trl-sft-")
    sft_args = SFTConfig(output_dir=out_dir, **knobs)

    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tok, callbacks=[timer])
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter  # read when train() builds its dataloader
    losses = record_losses(trainer)

    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    step_tokens = counter.tokens[:steps]
    write_json(args.result, {
        "side": "trl-defaults" if args.trl_defaults else "trl",
        "config": {"packing": packing, "padding_free": trainer.padding_free, "batch_size": batch_size,
                   "max_len": plan["max_len"], "steps": steps,
                   "gradient_checkpointing": timer.checkpointing_active, "bf16": sft_args.bf16,
                   "optim": str(sft_args.optim), "attn_implementation": model.config._attn_implementation,
                   "dtype": str(next(model.parameters()).dtype), "torch_threads": torch.get_num_threads(),
                   "sft_config_overrides": {k: v for k, v in knobs.items()}},
        "step_tokens": step_tokens,
        "step_label_tokens": counter.label_tokens[:steps],
        "losses": [float(x) for x in losses],
        "step_seconds": timer.step_seconds,
        "cycle_seconds": timer.cycle_seconds,
        "peak_rss_mib_train": timer.rss_at_end,
        "peak_rss_mib_exit": peak_rss_mib(),
        "wall_seconds_train": wall,
        "versions": versions("torch", "transformers", "tokenizers", "accelerate", "datasets", "trl"),
    })


def record_losses(trainer) -> list:
    """Keep each training loss (detached; read after training) to check both sides compute the same thing."""
    losses: list = []
    inner = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = inner(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if trainer.model.training:
            losses.append((out[0] if return_outputs else out).detach())
        return out

    trainer.compute_loss = compute_loss
    return losses


class CountingCollator:
    """Wraps TRL's collator; records the non-padding and supervised token counts of each batch."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.tokens: list[int] = []
        self.label_tokens: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        # padding-free: every row flattened into one sequence with no padding
        n = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        self.tokens.append(n)
        self.label_tokens.append(int((batch["labels"] != -100).sum()))
        return batch


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.cycle_seconds: list[float] = []
        self._t_begin = 0.0
        self._t_last_end: float | None = None
        self.rss_at_end: float | None = None
        self.checkpointing_active: bool | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs.get("model")  # the ground truth, whatever the config said
        self.checkpointing_active = bool(getattr(model, "is_activation_checkpointing", False))
        self._t_last_end = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self._t_begin)
        if self._t_last_end is not None:
            self.cycle_seconds.append(now - self._t_last_end)
        self._t_last_end = now

    def on_train_end(self, args, state, control, **kwargs):
        self.rss_at_end = peak_rss_mib()


if __name__ == "__main__":
    main()
