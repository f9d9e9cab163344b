"""`rlhf eval KIND`: the benchmarks that decide whether post-training helped, over JSONL.

Each kind lives in rlhf_cli/evals/<kind>.py (its config, Typer command and `evaluate`); they all
share the output of rlhf_cli/evals/base.py: one JSON summary line on stdout, a table on stderr,
`--log-samples FILE`, and `--plot FILE.png` over several `--model` values.

    rlhf eval exact gsm8k/test.jsonl -m base/ -m sft/ -m ppo/ --shots 8 --plot gsm8k.png
    rlhf eval mc mmlu/test/ --dev mmlu/dev/ --shots 5 -m sft/
    rlhf eval code HumanEval.jsonl.gz -m sft/ -n 10 --allow-code-exec
    rlhf eval winrate outputs.json --reference reference.json --judge api:gpt-4o-mini
    rlhf eval rm prefs.jsonl -m rm/
    rlhf eval ppl texts.jsonl -m sft/
"""

from __future__ import annotations

import typer

from rlhf_cli.evals import code, exact, mc, ppl, rm, winrate

app = typer.Typer(
    name="eval",
    help="Evaluate models: mc (log-likelihood multiple choice), exact (generate + extract), code (pass@k), "
    "winrate (judged, length-controlled), rm (reward-model accuracy), ppl (perplexity).\n\n"
    "Every kind prints one JSON summary line on stdout and a table on stderr; repeat --model to compare.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("exact", no_args_is_help=True)(exact.command)
app.command("rm", no_args_is_help=True)(rm.command)
app.command("ppl", no_args_is_help=True)(ppl.command)
app.command("mc", no_args_is_help=True)(mc.command)
app.command("winrate", no_args_is_help=True)(winrate.command)
app.command("code", no_args_is_help=True)(code.command)
