"""`rlhf pairwise`: preference pairs (or rankings) from any judge (InstructGPT step 2's labels).

Reads sample rows (`prompt` or `messages` + `completions`, K >= 2), or a human-labelled pairwise
set (PandaLM, LLMBar, our `{"prompt", "completions": [a, b], "label"}`), asks the judge about the
pairs of each prompt, and streams one pair row per decided pair (or one ranking row per prompt)
as each prompt finishes. A summary goes to stderr, `--report` writes it as JSON.

    rlhf pairwise samples.jsonl --judge rule:gsm8k --reference answer > pairs.jsonl
    rlhf pairwise samples.jsonl --judge api:gpt-4o-mini --max-cost 2 --output pairs.jsonl
    rlhf pairwise samples.jsonl --judge api:gpt-4o-mini --max-cost 2 --output pairs.jsonl --resume
    rlhf pairwise testset-v1.json --judge lm:SmolLM2-135M-Instruct --against testset-v1.json --report r.json
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.config import from_cli
from rlhf_cli.console import info
from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges import combine, drive
from rlhf_cli.judges.base import JudgeOptions, PairJudge, ScoreJudge
from rlhf_cli.judges.combine import Decision, Tally
from rlhf_cli.options import (
    JUDGE_PANEL,
    ApiKeyEnvOpt,
    BaseUrlOpt,
    CacheDirOpt,
    ConcurrencyOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    MaxCostOpt,
    OutputOpt,
    PricesOpt,
    SeedOpt,
    StreamResumeOpt,
    TemplateOpt,
    TrustOpt,
    refuse_extra_args,
)

EXIT_STOPPED = 3  # the judge stopped early (--max-cost, a human's quit): rows so far kept, resumable


JUDGE = JudgeOptions()


@dataclass(frozen=True)
class PairwiseConfig:
    samples: str
    judge: str | None = None  # a judge spec, e.g. rule:exact, lm:MODEL, api:MODEL, human
    output: str = "-"
    resume: bool = False  # append to `output`, skipping prompts already finished in it
    ranking: bool = False
    max_pairs: int | None = None
    both_orders: bool | None = None  # None: both for lm and api judges, one order for human
    keep_ties: bool = False
    flip_prob: float = 0.0
    report: str | None = None
    against: str | None = None
    resamples: int = 1000  # bootstrap resamples for the --against intervals
    judge_options: JudgeOptions = JUDGE  # the judge's knobs and --seed; flat on the command line and in --config

    COMMAND: ClassVar[str] = "pairwise"
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"resamples", "max_retries", "timeout"})  # --config FILE
    LIMITS: ClassVar[dict[str, Any]] = {"max_pairs": ">= 1", "flip_prob": "[0, 1]", "resamples": ">= 1"}

    @property
    def seed(self) -> int:
        """One seed for the pair plan, the order coin, --flip-prob and the judge."""
        return self.judge_options.seed


def command(
    ctx: typer.Context,
    samples: Annotated[str, typer.Argument(help="Sample rows (JSONL from `rlhf sample`), a labelled pairwise set, or '-'.", show_default=False)],
    judge: Annotated[str | None, typer.Option("--judge", "-j", help="rule:exact | rule:last-number | rule:gsm8k | rule:regex:PATTERN | rule:FILE.py:FN | rm:PATH | lm:MODEL | api:MODEL | human.", show_default=False)] = PairwiseConfig.judge,
    output: OutputOpt = PairwiseConfig.output,
    resume: StreamResumeOpt = PairwiseConfig.resume,
    ranking: Annotated[bool, typer.Option("--ranking", help="One ranking row per prompt instead of pair rows.")] = PairwiseConfig.ranking,
    max_pairs: Annotated[int | None, typer.Option("--max-pairs", help="Judge a seeded random N of each prompt's C(K,2) pairs.")] = PairwiseConfig.max_pairs,
    both_orders: Annotated[bool | None, typer.Option("--both-orders/--one-order", help="Pair judges: ask A|B and B|A; disagreement is a tie. Default: both for lm and api, one for human.", show_default=False)] = PairwiseConfig.both_orders,
    keep_ties: Annotated[bool, typer.Option("--keep-ties", help="Write tied pairs too, marked \"tie\": true.")] = PairwiseConfig.keep_ties,
    flip_prob: Annotated[float, typer.Option("--flip-prob", help="Flip each decided preference with this probability (simulated label noise).")] = PairwiseConfig.flip_prob,
    seed: SeedOpt = JUDGE.seed,
    report: Annotated[str | None, typer.Option("--report", help="Write the run's summary as JSON to this file.")] = PairwiseConfig.report,
    against: Annotated[str | None, typer.Option("--against", help="Human labels to agree with: [pandalm:|llmbar:|jsonl:]FILE.")] = PairwiseConfig.against,
    reference_field: Annotated[str, typer.Option("--reference", help="rule / human: the row field holding the reference answer.", rich_help_panel=JUDGE_PANEL)] = JUDGE.reference_field,
    template: TemplateOpt = JUDGE.template,
    base_url: BaseUrlOpt = JUDGE.base_url,
    api_key_env: ApiKeyEnvOpt = JUDGE.api_key_env,
    concurrency: ConcurrencyOpt = JUDGE.concurrency,
    prices: PricesOpt = JUDGE.prices,
    max_cost: MaxCostOpt = JUDGE.max_cost,
    cache_dir: CacheDirOpt = JUDGE.cache_dir,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="lm / rm: sequences per forward pass.", rich_help_panel=JUDGE_PANEL)] = JUDGE.batch_size,
    device: DeviceOpt = JUDGE.device,
    dtype: DtypeOpt = JUDGE.dtype,
    trust_remote_code: TrustOpt = JUDGE.trust_remote_code,
    config: ConfigOpt = None,
) -> None:
    """Judge the pairs of each prompt's completions; one pair row per decided pair on stdout (or --output FILE).

    Pair row: {"id": "PROMPT_ID:I-J", "prompt" (or "messages"), "chosen", "rejected",
    "margin"?, "judge": {kind, name, verdicts, shown, p_chosen, cost, cached, orders}} + the sample
    row's other fields. With --ranking: {"id", "prompt", "ranking": [[best...], ..., [worst...]]}.
    Label files (--against, or as input): PandaLM testset-v1.json, LLMBar dataset.json (also its
    Processed MT-Bench, FairEval, LLMEval2), or JSONL {"prompt", "completions": [a, b], "label": 0|1|"tie"}.
    Exit codes: 0 done, 2 bad input, 3 the judge stopped early (rows so far kept; --resume continues).
    --config FILE also sets the api judge's max-retries and timeout (seconds per request).

    Examples:

      rlhf pairwise samples.jsonl --judge rule:gsm8k --reference answer > pairs.jsonl

      rlhf pairwise samples.jsonl --judge rule:checks.py:is_correct --ranking > rankings.jsonl

      rlhf pairwise samples.jsonl --judge lm:HuggingFaceTB/SmolLM2-135M-Instruct --report report.json

      rlhf pairwise samples.jsonl --judge api:gpt-4o-mini --max-cost 2 -o pairs.jsonl --resume

      rlhf pairwise samples.jsonl --config judge.yaml -o pairs.jsonl   # judge, base-url, prices ...

      rlhf pairwise testset-v1.json --judge lm:sft/ --one-order --against testset-v1.json
    """
    refuse_extra_args(ctx)
    if run(from_cli(PairwiseConfig, ctx, locals(), config))["stopped"]:
        raise typer.Exit(EXIT_STOPPED)


def validate(cfg: PairwiseConfig) -> None:
    from rlhf_cli.config import check

    check(cfg)
    if not cfg.judge:
        raise RlhfError("no judge given", "e.g. --judge rule:exact, --judge lm:MODEL, --judge api:gpt-4o-mini or --judge human")
    if cfg.resume and cfg.output == "-":
        raise RlhfError("--resume needs the --output FILE to continue", "e.g. -o pairs.jsonl --resume")


def run(cfg: PairwiseConfig, judge: ScoreJudge | PairJudge | None = None) -> dict[str, Any]:
    """Judge, write rows, print the summary; returns the report. `judge` overrides `cfg.judge` (tests)."""
    from rlhf_cli.data.labels import read_items
    from rlhf_cli.judges import build_judge
    from rlhf_cli.judges.agreement import LabelIndex, read_labels
    from rlhf_cli.metrics import progress_bar

    # 1. read and validate all input (samples, labels, resume file) before building the judge
    validate(cfg)
    fmt, items = read_items(cfg.samples)
    labels = LabelIndex(read_labels(cfg.against)[1]) if cfg.against else None
    done = drive.resume_state(cfg.output) if cfg.resume else set()
    todo = [it for it in items if str(it.id) not in done]
    if done:
        info(f"resume: {len(items) - len(todo)} of {len(items)} prompts already in {cfg.output}")
    judge = judge or build_judge(cfg.judge, cfg.judge_options)  # type: ignore[arg-type]
    desc = judge.describe()
    if judge.kind == "rule" and desc.get("reference"):
        drive.check_references(todo, desc["reference"])  # before the progress bar starts and anything is written
    tally = Tally(labels)
    writer = drive.PromptWriter(cfg.output, cfg.resume)
    bar = progress_bar(judge.kind != "human")  # the human judge owns the terminal
    task = bar.add_task("pairwise", total=len(todo), stats="")

    def finish(item: Item, decisions: list[Decision], scores: list[float] | None = None) -> None:
        decisions = [combine.maybe_flip(d, item.id, cfg.flip_prob, cfg.seed) for d in decisions]
        tally.add(item, decisions)
        if cfg.ranking:
            row = combine.ranking_row(item, decisions, scores, desc)
            writer.write(item.id, [row] if row else [])
        else:
            writer.write(item.id, combine.pair_rows(item, decisions, desc, cfg.keep_ties))
        bar.update(task, advance=1, stats=f"{tally.decided} decided, {tally.ties} ties" + (f", ${tally.cost:.4f}" if tally.cost else ""))

    # 2. judge: score judges number every completion, pair judges answer ordered asks
    stopped: str | None = None
    finished = False
    try:
        with bar:
            if isinstance(judge, ScoreJudge):
                drive.score_all(judge, todo, tally, finish, cfg.max_pairs, cfg.seed)
            else:
                stopped = drive.ask_all(judge, todo, tally, finish, cfg.max_pairs, cfg.seed, cfg.both_orders)
        finished = True
    finally:
        close = getattr(judge, "close", None)
        if close is not None:
            close()
        writer.close(create=finished and stopped is None)

    # 3. summary, report, and how to continue
    report = make_report(tally, cfg, fmt, desc, len(items), len(items) - len(todo), stopped, writer.rows)
    show_summary(report)
    if cfg.report:
        from rlhf_cli.data.jsonl import atomic_file, dumps

        with atomic_file(cfg.report) as f:
            f.write(dumps(report))
    if stopped:
        drive.tell_stopped(stopped, tally.prompts, len(todo), cfg.output)
    return report


def make_report(t: Tally, cfg: PairwiseConfig, fmt: str, desc: dict[str, Any], n: int, resumed: int,
                stopped: str | None, rows: int) -> dict[str, Any]:
    """The summary as a dict: what --report writes and the stderr table shows."""
    from rlhf_cli.judges.agreement import agreement_report

    def share(a: int, b: int) -> float | None:
        return a / b if b else None

    out = {
        "input": cfg.samples, "format": fmt, "judge": desc, "prompts": n, "prompts_resumed": resumed,
        "prompts_judged": t.prompts, "pairs": t.pairs, "asks": t.asks, "decided": t.decided,
        "ties": t.ties, "dropped": t.dropped, "flipped": t.flipped, "rows": rows,
        "position_consistency": share(t.consistent, t.two_orders), "two_order_pairs": t.two_orders,
        "first_position_win_rate": share(t.a_won, t.a_or_b),
        "longer_won": share(t.longer_won, t.length_differs),
        "cost": t.cost, "cache_hits": t.cache_hits, "stopped": stopped, "agreement": None,
    }
    if t.labels is not None:
        out["agreement"] = {"labels": cfg.against, "n_labels": len(t.labels.labels),
                            **agreement_report(t.matched, cfg.resamples, cfg.seed)}
    return out


def show_summary(r: dict[str, Any]) -> None:
    """The report as a two-column table on stderr."""
    from rich.table import Table

    from rlhf_cli.console import err, is_main_process

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    t = Table(title=f"rlhf pairwise: {r['judge'].get('name', r['judge'].get('kind'))}", show_header=False)
    t.add_row("prompts judged", f"{r['prompts_judged']} of {r['prompts']}" + (f" ({r['prompts_resumed']} resumed)" if r["prompts_resumed"] else ""))
    t.add_row("pairs / asks", f"{r['pairs']} / {r['asks']}")
    t.add_row("decided / ties / dropped", f"{r['decided']} / {r['ties']} / {r['dropped']}" + (f" ({r['flipped']} flipped)" if r["flipped"] else ""))
    t.add_row("position consistency", f"{pct(r['position_consistency'])} of {r['two_order_pairs']} two-order pairs")
    t.add_row("A wins in first position", pct(r["first_position_win_rate"]))
    t.add_row("longer answer won", pct(r["longer_won"]))
    t.add_row("cost / cache hits", f"${r['cost']:.4f} / {r['cache_hits']}")
    a = r["agreement"]
    if a:
        for name in ("accuracy", "kappa"):
            ci = a[f"{name}_ci"]
            value = "-" if a[name] is None else f"{a[name]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            t.add_row(f"{name} vs labels (95% CI)", value)
        if a.get("accuracy_ties_half") is not None:
            t.add_row("accuracy, judge ties = 1/2", f"{a['accuracy_ties_half']:.3f}")
        t.add_row("labels matched", f"{a['n']} used of {a['matched']} matched ({a['n_labels']} labels)")
    if r["stopped"]:
        t.add_row("stopped", str(r["stopped"]))
    if is_main_process():
        err.print(t)
