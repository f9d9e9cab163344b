"""Options shared by several commands, declared once (the `hf` CLI's TokenOpt pattern)."""

from __future__ import annotations

from typing import Annotated, TypeVar

import typer

T = TypeVar("T")

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hub id, local HF directory, .gguf file, or builtin:tiny / builtin:small."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same seed, same result.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32 | bf16 (bf16 autocast over fp32 weights when training).")]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="YAML or JSON file of flag: value pairs (any field, e.g. kl-horizon: 5000); the command line wins."),
]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Write rows to this file instead of stdout ('-').")]
# Stream commands (sample, pairwise) resume into their --output file; registered with
# context_settings=STREAM so that the old `--resume FILE` gets a message naming the new spelling.
StreamResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Append to the --output FILE, skipping prompts already finished in it (after a kill or a stop).")
]
STREAM = {"allow_extra_args": True}

# The options every trainer shares (config.TrainOptions); each command passes its own defaults.
TRAIN = "Training"
OutOpt = Annotated[str, typer.Option("--out", help="Checkpoint directory to write (resume state goes to OUT-state/).")]
DeprecatedOutOpt = Annotated[str | None, typer.Option("-o", hidden=True, help="Deprecated spelling of --out.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUT-state/ after a crash or kill.")]
SaveEveryOpt = Annotated[int, typer.Option("--save-every", help="Save resume state every N steps (0: never).")]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Passes over the training data.", rich_help_panel=TRAIN)]
MaxStepsOpt = Annotated[
    int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps (overrides --epochs).", rich_help_panel=TRAIN)
]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=TRAIN)]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="constant | linear | cosine | wsd.", rich_help_panel=TRAIN)]
WarmupOpt = Annotated[float, typer.Option("--warmup", help="Warmup: a fraction of the steps (<1) or a step count.", rich_help_panel=TRAIN)]
DecayFracOpt = Annotated[float, typer.Option("--decay-frac", help="wsd: fraction of steps in the final decay.", rich_help_panel=TRAIN)]
MinLrRatioOpt = Annotated[float, typer.Option("--min-lr-ratio", help="The schedule ends at lr x this.", rich_help_panel=TRAIN)]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay on matrices.", rich_help_panel=TRAIN)]
MaxGradNormOpt = Annotated[float, typer.Option("--max-grad-norm", help="Clip the global grad norm (0: off).", rich_help_panel=TRAIN)]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", help="Microbatches per optimizer step (per process).", rich_help_panel=TRAIN)]
LoraOpt = Annotated[int, typer.Option("--lora", help="LoRA rank via peft (0: full fine-tuning).", rich_help_panel=TRAIN)]
LoraAlphaOpt = Annotated[float, typer.Option("--lora-alpha", help="LoRA scaling numerator (alpha / r).", rich_help_panel=TRAIN)]
KeepAdapterOpt = Annotated[bool, typer.Option("--keep-adapter", help="Save the LoRA adapter instead of merging it.", rich_help_panel=TRAIN)]
GradCkptOpt = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward.", rich_help_panel=TRAIN)
]
ShardOpt = Annotated[str, typer.Option(
    "--shard", help="Under torchrun: none = DDP (whole model per process); full = FSDP2 (weights, grads, AdamW sharded).",
    rich_help_panel=TRAIN)]
RefShardOpt = Annotated[bool, typer.Option(
    "--ref-shard", help="With --shard full: split the frozen reference over the processes too, instead of a whole copy on each.",
    rich_help_panel=TRAIN)]
ShardOffloadOpt = Annotated[bool, typer.Option("--shard-offload", help="With --shard full on CUDA: keep the shards in CPU memory.", rich_help_panel=TRAIN)]
LogitsBudgetOpt = Annotated[float, typer.Option(
    "--logits-budget", help="MiB of (tokens x vocabulary) logits the log-prob head may keep for backward; above it, "
    "tiles recomputed in backward (0: always tile).", rich_help_panel=TRAIN)]
ENGINE_PANEL = "Generation engine"
EngineOpt = Annotated[str, typer.Option(
    "--engine", help="hf: our KV-cached sampler; vllm: in-process vLLM (pip install 'rlhf-cli[vllm]').", rich_help_panel=ENGINE_PANEL)]
EngineMemoryOpt = Annotated[float, typer.Option(
    "--engine-memory", help="vllm: its share of GPU memory (weights + KV cache); on CPU, a cap on its KV pool as a share of RAM.",
    rich_help_panel=ENGINE_PANEL)]
EngineLogprobsOpt = Annotated[bool, typer.Option(
    "--engine-logprobs", help="vllm: weight each token's loss by min(p_trainer / p_engine, --tis-cap) (truncated importance sampling).",
    rich_help_panel=ENGINE_PANEL)]
TisCapOpt = Annotated[float, typer.Option("--tis-cap", help="The truncation of --engine-logprobs' importance weights.", rich_help_panel=ENGINE_PANEL)]
FormatOpt = Annotated[
    str,
    typer.Option("--format", help="chat: prompts go through the chat template (ChatML if none). raw: plain text."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model repos to run their own Python code (off by default).")
]

# The lm / api judge's knobs, shared by `rlhf pairwise` and `rlhf eval winrate` (both fill a JudgeOptions).
JUDGE_PANEL = "Judge options"
TemplateOpt = Annotated[
    str | None, typer.Option("--template", help="lm / api: pairwise prompt template file.", rich_help_panel=JUDGE_PANEL)
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option("--base-url", help="api: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1.", rich_help_panel=JUDGE_PANEL),
]
ApiKeyEnvOpt = Annotated[
    str, typer.Option("--api-key-env", help="api: name of the environment variable holding the key.", rich_help_panel=JUDGE_PANEL)
]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="api: requests in flight.", rich_help_panel=JUDGE_PANEL)]
PricesOpt = Annotated[
    str | None,
    typer.Option("--prices", help="api: 'IN,OUT' dollars per million tokens, or a JSON price table.", rich_help_panel=JUDGE_PANEL),
]
MaxCostOpt = Annotated[
    float | None,
    typer.Option("--max-cost", help="api: stop cleanly after this many dollars (exit 3); a rerun reuses the cached verdicts.",
                 rich_help_panel=JUDGE_PANEL),
]
CacheDirOpt = Annotated[str | None, typer.Option("--cache-dir", help="api: verdict cache directory.", rich_help_panel=JUDGE_PANEL)]


# `--model api:MODEL` (sample, eval exact, eval code): the api judge's client knobs, for a generating model;
# max-retries and timeout are --config keys, as for the judge.
API_PANEL = "API model (--model api:MODEL)"
ModelBaseUrlOpt = Annotated[
    str | None,
    typer.Option("--base-url", help="api:MODEL: OpenAI-compatible endpoint (default OpenAI's), e.g. http://127.0.0.1:8080/v1.",
                 rich_help_panel=API_PANEL),
]
ModelApiKeyEnvOpt = Annotated[
    str, typer.Option("--api-key-env", help="api:MODEL: name of the environment variable holding the key.", rich_help_panel=API_PANEL)
]
ModelConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="api:MODEL: requests in flight.", rich_help_panel=API_PANEL)]
ModelPricesOpt = Annotated[
    str | None,
    typer.Option("--prices", help="api:MODEL: 'IN,OUT' dollars per million tokens, or a JSON price table.", rich_help_panel=API_PANEL),
]
ModelMaxCostOpt = Annotated[
    float | None,
    typer.Option("--max-cost", help="api:MODEL: send no request that could take the spend past this many dollars; stop with exit 3.",
                 rich_help_panel=API_PANEL),
]


def refuse_extra_args(ctx: typer.Context) -> None:
    """A stream command's stray argument: one line naming it (exit 2), nothing read or written.

    The commands accept extra arguments only so that this message can name the new spelling of
    the old `--resume FILE` when it is mistyped; the old spelling itself is rewritten before
    parsing (`cli.legacy_resume`).
    """
    from rlhf_cli.errors import RlhfError

    if ctx.args:
        raise RlhfError(f"unexpected extra argument {ctx.args[0]!r}",
                        "--resume is a switch now: resume into a file with `--output FILE --resume`")


def deprecated(old: str, new: str, value: T) -> T:
    """Warn that `old` is an old spelling of `new` (kept for one release) and pass its value on."""
    from rlhf_cli.console import warn

    warn(f"{old} is deprecated and will be removed in the next release; use {new}")
    return value
