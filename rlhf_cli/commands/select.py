"""`rlhf select`: keep the best of each prompt's K samples (best-of-n, rejection sampling, expert iteration).

Reads `sample` rows (`prompt` or `messages` + K `completions`), judges every completion, and streams
what it keeps as each prompt finishes: SFT rows for `rlhf sft` (`--keep best`, `top-N`,
`all-passing`) or one preference pair per prompt for `train-rm` / `dpo` (`--keep best-worst`).

    rlhf sample prompts.jsonl -m sft/ -n 8 > samples.jsonl
    rlhf select samples.jsonl --judge rm:rm/ --keep best > sft2.jsonl                 # rejection sampling
    rlhf select samples.jsonl --judge rule:gsm8k --reference answer --keep all-passing > sft2.jsonl
    rlhf select samples.jsonl --judge api:gpt-4o-mini --keep best-worst --max-cost 1 -o prefs.jsonl
    rlhf sft sft2.jsonl -m sft/ --out sft2/                                           # one round of expert iteration

A score judge (`rule:...`, `rm:PATH`, `rule:FILE.py:FN`) gives each completion a number. A pair judge
(`lm:`, `api:`, `human`) is asked about every pair of distinct completions through `pairwise`'s
machinery (both orders for lm and api, the verdict cache, `--max-cost`), and a completion's score is
its Copeland points, (wins - losses) / 2. What is kept, and which prompts give nothing (all fail,
all tie), is in rlhf_cli/judges/selection.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.config import from_cli
from rlhf_cli.console import info, warn
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import JudgeOptions, PairJudge, ScoreJudge
from rlhf_cli.judges.selection import KEEP_MODES, parse_keep
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
class SelectConfig:
    samples: str
    judge: str | None = None
    keep: str = "best"  # best | top-N | all-passing | best-worst
    threshold: float | None = None  # the pass mark; None: 1 (correct) for rule judges, none for the others
    keep_ties: bool = False
    drop_truncated: bool = False  # never keep a completion whose finish_reason is "length"
    output: str = "-"
    resume: bool = False
    max_pairs: int | None = None  # pair judges: a seeded random N of each prompt's C(K,2) pairs
    both_orders: bool | None = None  # None: both for lm and api judges, one order for human
    judge_options: JudgeOptions = JUDGE

    COMMAND: ClassVar[str] = "select"
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"max_retries", "timeout"})
    LIMITS: ClassVar[dict[str, Any]] = {"max_pairs": ">= 1"}

    @property
    def seed(self) -> int:
        return self.judge_options.seed


def command(
    ctx: typer.Context,
    samples: Annotated[str, typer.Argument(help="Sample rows (JSONL from `rlhf sample -n K`), or '-'.", show_default=False)],
    judge: Annotated[str | None, typer.Option("--judge", "-j", help="rule:exact | rule:gsm8k | rule:FILE.py:FN | rm:PATH (score judges) | lm:MODEL | api:MODEL | human (pair judges).", show_default=False)] = SelectConfig.judge,
    keep: Annotated[str, typer.Option("--keep", help=f"{KEEP_MODES}.")] = SelectConfig.keep,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Score judges: the pass mark; a completion below it is never kept. Default: 1 (correct) for rule judges, none for rm.", show_default=False)] = SelectConfig.threshold,
    keep_ties: Annotated[bool, typer.Option("--keep-ties", help="Keep prompts whose completions all tie (the first one, or a pair), marked \"tie\": true.")] = SelectConfig.keep_ties,
    drop_truncated: Annotated[bool, typer.Option("--drop-truncated", help="Never keep a completion cut at the token limit (finish_reason \"length\"): SFT would teach stopping mid-answer.")] = SelectConfig.drop_truncated,
    output: OutputOpt = SelectConfig.output,
    resume: StreamResumeOpt = SelectConfig.resume,
    max_pairs: Annotated[int | None, typer.Option("--max-pairs", help="Pair judges: judge a seeded random N of each prompt's C(K,2) pairs.")] = SelectConfig.max_pairs,
    both_orders: Annotated[bool | None, typer.Option("--both-orders/--one-order", help="Pair judges: ask A|B and B|A; disagreement is a tie. Default: both for lm and api, one for human.", show_default=False)] = SelectConfig.both_orders,
    seed: SeedOpt = JUDGE.seed,
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
    """Keep the best of each prompt's K completions: SFT rows (rejection sampling) or best-vs-worst pairs.

    SFT row (best, top-N, all-passing): {"id": "PROMPT_ID:I", "prompt", "completion"} (or "messages"
    with the completion as the last assistant turn), "judge": {kind, name, score, rank, candidates,
    cost}, "finish_reason", + the sample row's other fields. Pair row (best-worst): as `rlhf
    pairwise` writes, {"id": "PROMPT_ID:I-J", "prompt", "chosen", "rejected", "margin", "judge"}.
    A prompt gives nothing when no completion reaches --threshold, or when all tie (kept with
    --keep-ties); the summary on stderr counts both. Exit codes: 0 done, 2 bad input, 3 the judge
    stopped early (rows so far kept; --output FILE --resume continues).

    Examples:

      rlhf select samples.jsonl --judge rm:rm/ --keep best > sft2.jsonl

      rlhf select samples.jsonl --judge rule:gsm8k --reference answer --keep all-passing > sft2.jsonl

      rlhf select samples.jsonl --judge rm:rm/ --keep top-2 --threshold 0.5 > sft2.jsonl

      rlhf select samples.jsonl --judge rm:rm/ --keep best-worst > prefs.jsonl && rlhf dpo prefs.jsonl -m sft/ --out dpo/

      rlhf select samples.jsonl --judge api:gpt-4o-mini --keep best --max-cost 1 -o sft2.jsonl --resume
    """
    refuse_extra_args(ctx)
    if run(from_cli(SelectConfig, ctx, locals(), config))["stopped"]:
        raise typer.Exit(EXIT_STOPPED)


def validate(cfg: SelectConfig) -> None:
    from rlhf_cli.config import check

    check(cfg)
    if not cfg.judge:
        raise RlhfError("no judge given", "e.g. --judge rule:exact --reference answer, --judge rm:rm/ or --judge api:gpt-4o-mini")
    try:
        parse_keep(cfg.keep)
    except ValueError:
        raise RlhfError(f"--keep {cfg.keep!r} is not a keep mode", f"use {KEEP_MODES}") from None
    if cfg.resume and cfg.output == "-":
        raise RlhfError("--resume needs the --output FILE to continue", "e.g. -o sft2.jsonl --resume")


def pass_mark(cfg: SelectConfig, judge: ScoreJudge | PairJudge) -> float | None:
    """The threshold in force: --threshold, else 1 (correct) for a rule judge. A pair judge's
    Copeland points depend on K, so no fixed pass mark fits them."""
    if isinstance(judge, PairJudge):
        if cfg.threshold is not None:
            raise RlhfError("--threshold needs a score judge (rule:, rm:); a pair judge only orders the completions",
                            "drop --threshold, or score with --judge rm:PATH")
        if cfg.keep == "all-passing":
            raise RlhfError("--keep all-passing needs a score judge (rule:, rm:) and a pass mark", "use --keep best or top-N with a pair judge")
        return None
    if cfg.threshold is not None:
        return cfg.threshold
    if judge.kind == "rule":
        return 1.0
    if cfg.keep == "all-passing":
        raise RlhfError(f"--keep all-passing with a {judge.kind} judge needs --threshold", "e.g. --threshold 0.5 (a reward)")
    return None


def run(cfg: SelectConfig, judge: ScoreJudge | PairJudge | None = None) -> dict[str, Any]:
    """Judge, keep, write, summarise; returns the summary. `judge` overrides `cfg.judge` (tests)."""
    from rlhf_cli.data.labels import read_items
    from rlhf_cli.data.records import Item
    from rlhf_cli.judges import build_judge, drive, selection
    from rlhf_cli.judges.combine import Decision, Tally, copeland_points, distinct
    from rlhf_cli.metrics import progress_bar

    # 1. read and validate all input before building the judge
    validate(cfg)
    _, items = read_items(cfg.samples, "samples", min_completions=1)
    done = drive.resume_state(cfg.output) if cfg.resume else set()
    todo = [it for it in items if str(it.id) not in done]
    if done:
        info(f"resume: {len(items) - len(todo)} of {len(items)} prompts already in {cfg.output}")
    if cfg.drop_truncated and not any(isinstance(it.row.get("finish_reasons"), list) for it in todo):
        warn("--drop-truncated: the rows have no finish_reasons (rows from `rlhf sample` do), so nothing is dropped for it")
    judge = judge or build_judge(cfg.judge, cfg.judge_options)  # type: ignore[arg-type]
    threshold = pass_mark(cfg, judge)
    desc = judge.describe()
    if isinstance(judge, PairJudge):
        desc["method"] = "copeland"
    if judge.kind == "rule" and desc.get("reference"):
        drive.check_references(todo, desc["reference"])

    # 2. judge each prompt; keep what the mode keeps, as soon as the prompt is finished
    summary = Summary(len(items), len(items) - len(todo), threshold)
    tally = Tally()
    writer = drive.PromptWriter(cfg.output, cfg.resume)
    bar = progress_bar(judge.kind != "human")  # the human judge owns the terminal
    task = bar.add_task("select", total=len(todo), stats="")

    def allowed(item: Item) -> list[bool] | None:
        reasons = item.row.get("finish_reasons")
        if not cfg.drop_truncated or not isinstance(reasons, list) or len(reasons) != len(item.completions):
            return None
        return [r != "length" for r in reasons]

    def finish(item: Item, decisions: list[Decision], scores: list[float] | None = None) -> None:
        if scores is None:  # a pair judge: Copeland points over the judged pairs
            points = copeland_points(distinct(item.completions), decisions)
            scores = [points.get(k, 0.0) for k in range(len(item.completions))]
        cost = sum((v.cost for d in decisions for v in d.verdicts), 0.0)
        choice = selection.choose(item.completions, scores, cfg.keep, threshold, cfg.keep_ties, allowed(item))
        make = selection.pair_row if cfg.keep == "best-worst" else selection.sft_rows
        rows = make(item, choice, scores, desc, cost) if choice.kept else []
        writer.write(item.id, rows)
        summary.add(choice, scores, [scores[k] for k in (choice.kept[:1] if cfg.keep == "best-worst" else choice.kept)])  # a pair: its chosen
        bar.update(task, advance=1, stats=f"{summary.kept} kept, {summary.all_fail + summary.all_tie} dropped" + (f", ${tally.cost:.4f}" if tally.cost else ""))

    stopped: str | None = None
    finished = False
    try:
        with bar:
            if isinstance(judge, PairJudge):
                stopped = drive.ask_all(judge, todo, tally, finish, cfg.max_pairs, cfg.seed, cfg.both_orders)
            else:
                drive.score_all(judge, todo, tally, finish, max_pairs=0, seed=cfg.seed)  # scores only, no pairs
        finished = True
    finally:
        close = getattr(judge, "close", None)
        if close is not None:
            close()
        writer.close(create=finished and stopped is None)

    # 3. summary, and how to continue
    out = summary.report(desc, cfg.keep, writer.rows, tally.cost, stopped)
    summary.show(out)
    if stopped:
        drive.tell_stopped(stopped, summary.prompts, len(todo), cfg.output)
    return out


class Summary:
    """Counts for the stderr table: prompts kept / dropped (and why), and the score distribution."""

    def __init__(self, total: int, resumed: int, threshold: float | None) -> None:
        self.total, self.resumed, self.threshold = total, resumed, threshold
        self.prompts = self.kept = self.all_fail = self.all_tie = self.ties_kept = 0
        self.scores: list[float] = []
        self.kept_scores: list[float] = []

    def add(self, choice: Any, scores: list[float], kept_scores: list[float]) -> None:
        self.prompts += 1
        self.kept += bool(choice.kept)
        self.all_fail += choice.dropped == "all-fail"
        self.all_tie += choice.dropped == "all-tie"
        self.ties_kept += choice.tie
        self.scores.extend(scores)
        self.kept_scores.extend(kept_scores)

    def report(self, desc: dict[str, Any], keep: str, rows: int, cost: float, stopped: str | None) -> dict[str, Any]:
        import statistics

        def dist(xs: list[float]) -> dict[str, float] | None:
            if not xs:
                return None
            q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
            return {"mean": statistics.fmean(xs), "min": min(xs), "p25": q[0], "median": q[1], "p75": q[2], "max": max(xs)}

        passing = None if self.threshold is None or not self.scores else sum(s >= self.threshold for s in self.scores) / len(self.scores)
        return {"judge": desc, "keep": keep, "threshold": self.threshold, "prompts": self.total, "prompts_resumed": self.resumed,
                "prompts_judged": self.prompts, "prompts_kept": self.kept, "dropped_all_fail": self.all_fail,
                "dropped_all_tie": self.all_tie, "ties_kept": self.ties_kept, "rows": rows, "completions": len(self.scores),
                "passing": passing, "scores": dist(self.scores), "kept_scores": dist(self.kept_scores), "cost": cost, "stopped": stopped}

    def show(self, r: dict[str, Any]) -> None:
        from rich.table import Table

        from rlhf_cli.console import err

        def d(x: dict[str, float] | None) -> str:
            return "-" if x is None else f"mean {x['mean']:.3g} | min {x['min']:.3g}  p25 {x['p25']:.3g}  median {x['median']:.3g}  p75 {x['p75']:.3g}  max {x['max']:.3g}"

        t = Table(title=f"rlhf select --keep {r['keep']}: {r['judge'].get('name', r['judge'].get('kind'))}", show_header=False)
        t.add_row("prompts judged", f"{r['prompts_judged']} of {r['prompts']}" + (f" ({r['prompts_resumed']} resumed)" if r["prompts_resumed"] else ""))
        t.add_row("prompts kept / rows written", f"{r['prompts_kept']} / {r['rows']}" + (f" ({r['ties_kept']} ties kept)" if r["ties_kept"] else ""))
        t.add_row("dropped: all fail / all tie", f"{r['dropped_all_fail']} / {r['dropped_all_tie']}")
        if r["passing"] is not None:
            t.add_row(f"completions >= {r['threshold']:g}", f"{100 * r['passing']:.1f}% of {r['completions']}")
        t.add_row("scores, all", d(r["scores"]))
        t.add_row("scores, kept", d(r["kept_scores"]))
        if r["cost"]:
            t.add_row("cost", f"${r['cost']:.4f}")
        if r["stopped"]:
            t.add_row("stopped", str(r["stopped"]))
        err.print(t)
