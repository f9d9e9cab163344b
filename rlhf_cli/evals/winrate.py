"""`rlhf eval winrate`: candidate outputs against reference outputs, judged in both orders (AlpacaEval).

Inputs, matched by instruction text (read by rlhf_cli/evals/alpaca_data.py):
  * candidates: AlpacaEval `model_outputs.json` (a JSON array of {"instruction", "output", "generator",
    "dataset"}), JSONL with the same fields, `rlhf sample` rows ({"prompt", "completions": [first, ...]}),
    or any JSONL with `--field instruction=COL --field output=COL`; or `-m MODEL` generates them from the
    reference's instructions (chat template, greedy by default); `-m api:MODEL` asks an OpenAI-compatible
    server through the judge's client options (--base-url, --api-key-env, --concurrency, --prices,
    --max-cost: one budget for generating and judging), and `--engine vllm` serves local ones with
    in-process vLLM; for a policy and a judge on different servers, `rlhf sample` the outputs first and
    pass the file;
  * `--reference FILE`: the same layouts (AlpacaEval 2's reference is gpt4_1106_preview's model_outputs.json);
  * or `--annotations FILE`: AlpacaEval annotations.json ({"instruction", "output_1" (the reference),
    "output_2" (the model), "generator_2", "preference" in [1, 2]}), scored without calling a judge.

Judging: any `rlhf pairwise` judge. Pair judges (lm:, api:, human) see each pair in both orders
(human: one seeded order unless --both-orders); orders that disagree are a tie. Score judges (rm:,
rule:) score each output alone. Identical outputs are a tie without asking (as AlpacaEval does).

Metrics (AlpacaEval's `get_winrate`, src/alpaca_eval/metrics/{winrate,helpers}.py): with preference
p in [1, 2] (1 = the reference is better, 2 = the candidate, 1.5 = a tie; a legacy 0 also means a tie;
null = no answer, left out), win_rate = 100 * mean(p - 1) with standard error 100 * sem(p - 1) (ddof 1),
n_wins = #(p > 1.5), n_losses = #(p < 1.5), n_draws = #(p == 1.5), discrete_win_rate = the same
mean after rounding p to 1 / 1.5 / 2. lc_win_rate: the length-controlled win rate of AlpacaEval 2
(rlhf_cli/evals/length_control.py).

Fidelity: on the 59 AlpacaEval 2 annotation files that the tatsu-lab/alpaca_eval repository holds
(weighted_alpaca_eval_gpt4_turbo), win_rate, its standard error and the counts equal the published
leaderboard to 1e-9; the LC win rate differs (alpaca-7b: 19.83 here, 5.88 published) because the
official GLM also uses per-instruction difficulties and "gamed" baselines that are only on the HF hub.

    rlhf eval winrate outputs.json --reference ../shared/data/alpaca_eval/results/gpt4_1106_preview/model_outputs.json --judge api:gpt-4o-mini --max-cost 5
    rlhf eval winrate --reference ref.json -m base/ -m sft/ -m ppo/ --judge lm:judge/ --plot winrate.png
    rlhf eval winrate --annotations ../shared/data/alpaca_eval/results/alpaca-7b/weighted_alpaca_eval_gpt4_turbo/annotations.json
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.config import check, from_cli
from rlhf_cli.console import warn
from rlhf_cli.engines import ENGINES
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals.alpaca_data import (
    Output,
    Pair,
    label_of,
    lookup_difficulty,
    match,
    read_annotations,
    read_difficulty,
    read_outputs,
)
from rlhf_cli.evals.base import EvalResult, FieldOpt, LimitOpt, LogSamplesOpt, ModelsOpt, PlotOpt, parse_fields, report
from rlhf_cli.evals.length_control import length_controlled
from rlhf_cli.evals.winrate_judge import best_of_sets, judge_sets, select_scores
from rlhf_cli.judges.base import JudgeOptions
from rlhf_cli.options import (
    JUDGE_PANEL,
    ApiKeyEnvOpt,
    BaseUrlOpt,
    CacheDirOpt,
    ConcurrencyOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EngineMemoryOpt,
    EngineOpt,
    MaxCostOpt,
    PricesOpt,
    SeedOpt,
    TemplateOpt,
    TrustOpt,
)

FIELDS = ("instruction", "output", "generator")
EXIT_STOPPED = 3  # the judge stopped early (--max-cost, a human's quit): the summary covers what was judged
GEN = "Generation (-m)"


JUDGE = JudgeOptions()


@dataclass(frozen=True)
class WinrateConfig:
    outputs: tuple[str, ...] = ()
    reference: str | None = None  # the reference outputs file
    models: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()
    judge: str | None = None
    fields: tuple[str, ...] = ()  # NAME=COLUMN, as --field
    limit: int | None = None
    both_orders: bool | None = None  # None: both for every pair judge but `human`
    weighted: bool = False
    difficulty: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.0
    n: int = 1  # -m: outputs per instruction; > 1 needs --select
    select: str | None = None  # -m with n > 1: a score judge keeps each instruction's best output (best-of-n)
    engine: str = "hf"  # -m local models: hf = generation.generate, vllm = an in-process vLLM engine
    engine_memory: float = 0.3
    log_samples: str | None = None
    plot: str | None = None
    judge_options: JudgeOptions = JUDGE  # the judge's knobs, and --seed, --batch-size, --device, --dtype for -m too

    COMMAND: ClassVar[str] = "eval winrate"
    FLAGS: ClassVar[dict[str, str]] = {"models": "--model", "fields": "--field", "difficulty": "--instruction-difficulty", "n": "-n"}
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"max_retries", "timeout"})  # --config FILE
    LIMITS: ClassVar[dict[str, Any]] = {"limit": ">= 1", "max_new_tokens": ">= 1", "temperature": ">= 0", "n": ">= 1", "engine": ENGINES,
                                        "engine_memory": "(0, 1]"}

    @property
    def seed(self) -> int:
        return self.judge_options.seed


def command(
    ctx: typer.Context,
    outputs: Annotated[list[str] | None, typer.Argument(help="Candidate outputs (AlpacaEval JSON array or JSONL; one result each), or '-'.", show_default=False)] = None,
    reference: Annotated[str | None, typer.Option("--reference", "-r", help="Reference outputs, matched to candidates by instruction.")] = WinrateConfig.reference,
    models: ModelsOpt = None,  # type: ignore[assignment]
    annotations: Annotated[list[str] | None, typer.Option("--annotations", help="AlpacaEval annotations.json: score its preferences, no judge (repeatable).")] = None,
    judge: Annotated[str | None, typer.Option("--judge", "-j", help="rule:... | rm:PATH | lm:MODEL | api:MODEL | human (as in `rlhf pairwise`).")] = WinrateConfig.judge,
    fields: FieldOpt = None,
    limit: LimitOpt = WinrateConfig.limit,
    both_orders: Annotated[bool | None, typer.Option("--both-orders/--one-order", help="Pair judges: ask A|B and B|A, disagreement is a tie. Default: both, one for human.", show_default=False)] = WinrateConfig.both_orders,
    weighted: Annotated[bool, typer.Option("--weighted", help="Use the judge's P(better), averaged over both orders, as the preference (AlpacaEval 2's weighted judge).")] = WinrateConfig.weighted,
    difficulty: Annotated[str | None, typer.Option("--instruction-difficulty", help="AlpacaEval's instruction_difficulty.csv (index = reference row): adds the GLM's difficulty term.")] = WinrateConfig.difficulty,
    log_samples: LogSamplesOpt = WinrateConfig.log_samples,
    plot: PlotOpt = WinrateConfig.plot,
    seed: SeedOpt = JUDGE.seed,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="-m: longest output, in tokens.", rich_help_panel=GEN)] = WinrateConfig.max_new_tokens,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="-m: 0 = greedy.", rich_help_panel=GEN)] = WinrateConfig.temperature,
    n: Annotated[int, typer.Option("-n", "--n", help="-m: outputs per instruction, of which --select keeps one.", rich_help_panel=GEN)] = WinrateConfig.n,
    select: Annotated[str | None, typer.Option("--select", help="-m with -n K: keep the output this score judge (rm:PATH, rule:...) scores highest; "
                                              "every output is judged, for best_of_1, 2, 4 ... K.", rich_help_panel=GEN, show_default=False)] = WinrateConfig.select,
    engine: EngineOpt = WinrateConfig.engine,
    engine_memory: EngineMemoryOpt = WinrateConfig.engine_memory,
    reference_field: Annotated[str, typer.Option("--answer-field", help="rule: the reference-row field holding the reference answer (pairwise's --reference; here --reference is the file).", rich_help_panel=JUDGE_PANEL)] = JUDGE.reference_field,
    template: TemplateOpt = JUDGE.template,
    base_url: BaseUrlOpt = JUDGE.base_url,
    api_key_env: ApiKeyEnvOpt = JUDGE.api_key_env,
    concurrency: ConcurrencyOpt = JUDGE.concurrency,
    prices: PricesOpt = JUDGE.prices,
    max_cost: MaxCostOpt = JUDGE.max_cost,
    cache_dir: CacheDirOpt = JUDGE.cache_dir,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="lm / rm judge and -m generation: sequences per forward pass.")] = JUDGE.batch_size,
    device: DeviceOpt = JUDGE.device,
    dtype: DtypeOpt = JUDGE.dtype,
    trust_remote_code: TrustOpt = JUDGE.trust_remote_code,
    config: ConfigOpt = None,
) -> None:
    """Judged win rate of candidate outputs against reference outputs, with AlpacaEval 2's length control.

    Summary per candidate: win_rate (%, ± standard error), lc_win_rate (length-controlled, %),
    discrete_win_rate, n_wins / n_draws / n_losses, avg_length and ref_avg_length (characters).
    --log-samples rows: {"model", "id", "input" (instruction), "output", "target" (the reference
    output), "score" (P(candidate better): 1, 0.5, 0), "preference" (AlpacaEval's 1..2), "judge"}.
    Exit codes: 0 done, 2 bad input, 3 the judge stopped early (the summary covers what it judged).
    --engine vllm generates the -m outputs with in-process vLLM (pip install 'rlhf-cli[vllm]').
    -m with -n K -t T --select JUDGE: best-of-n. Every one of the K outputs is judged against the
    reference (K judgements per instruction); the metrics are those of the output JUDGE keeps, plus
    best_of_1, 2, 4 ... K, the win rate (%) of the kept output among n.

    Examples:

      rlhf eval winrate model_outputs.json --reference gpt4_1106_preview/model_outputs.json --judge api:gpt-4o-mini

      rlhf eval winrate --reference ref.json -m base/ -m sft/ -m ppo/ --judge lm:judge/ --plot winrate.png

      rlhf eval winrate --annotations alpaca-7b/weighted_alpaca_eval_gpt4_turbo/annotations.json

      rlhf eval winrate samples.jsonl --reference ref.jsonl --field instruction=prompt --judge rm:rm/

      rlhf eval winrate --reference ref.json -m sft/ -n 8 -t 1 --select rm:rm/ --judge lm:judge/ --plot best_of_n.png
    """
    params = {**locals(), "outputs": tuple(outputs or ()), "models": tuple(models or ()), "annotations": tuple(annotations or ()),
              "fields": tuple(fields or ())}
    results = run(from_cli(WinrateConfig, ctx, params, config))
    if any(r.extra.get("stopped") for r in results):
        raise typer.Exit(EXIT_STOPPED)


# ---------------------------------------------------------------------------------- the run


def validate(cfg: WinrateConfig) -> dict[str, str]:
    """Ranges and which inputs go together; returns the --field mapping."""
    check(cfg)
    if cfg.annotations and (cfg.outputs or cfg.models or cfg.reference or cfg.judge):
        raise RlhfError("--annotations already holds both outputs and preferences", "give --annotations alone, or outputs/-m with --reference and --judge")
    if not cfg.annotations:
        if not cfg.reference:
            raise RlhfError("--reference FILE is required (or score existing judgements with --annotations FILE)")
        if not (cfg.outputs or cfg.models):
            raise RlhfError("nothing to evaluate", "give candidate output files, or -m MODEL to generate them")
        if not cfg.judge:
            raise RlhfError("--judge is required to compare outputs", "e.g. --judge api:gpt-4o-mini, --judge lm:MODEL, --judge rm:PATH")
    if cfg.n > 1 and not (cfg.select and cfg.models):
        raise RlhfError("-n > 1 generates K outputs per instruction for --select to choose from", "give -m MODEL and --select rm:PATH (or rule:...)")
    if cfg.select and cfg.n < 2:
        raise RlhfError("--select chooses among outputs: it needs -n K >= 2", "e.g. -m sft/ -n 8 -t 1 --select rm:rm/")
    if cfg.n > 1 and cfg.temperature == 0:
        raise RlhfError("-n > 1 with --temperature 0 gives K identical outputs", "use a temperature > 0")
    if cfg.engine != WinrateConfig.engine and not cfg.models:
        warn(f"--engine {cfg.engine} generates for -m only; nothing to generate here (the judge runs as it always does)")
    return parse_fields(list(cfg.fields), FIELDS)


def run(cfg: WinrateConfig, judge: Any = None) -> list[EvalResult]:
    """Read and match everything, generate for each -m, judge, score; `judge` overrides cfg.judge (tests)."""
    # 1. read and validate all input before any model or judge
    fields = validate(cfg)
    difficulty = read_difficulty(cfg.difficulty) if cfg.difficulty else None
    if cfg.annotations:
        sets = [read_annotations(p, cfg.limit) for p in cfg.annotations]
        results = [score_set(label, pairs, None, difficulty, cfg.difficulty) for label, pairs in sets]
        report(results, ", ".join(cfg.annotations), cfg.log_samples, cfg.plot)
        return results
    refs = read_outputs(cfg.reference, fields)  # type: ignore[arg-type]
    sets = [(label_of(p, rows), match(rows, refs, cfg.reference, cfg.limit)) for p in cfg.outputs for rows in [read_outputs(p, fields)]]  # type: ignore[arg-type]
    refs = refs[: cfg.limit]
    if difficulty is not None:
        lookup_difficulty(difficulty, _ref_pairs(refs, [r.output for r in refs], "reference"), cfg.difficulty)
    if cfg.models:
        from rlhf_cli.engines import check_engine
        from rlhf_cli.models.loading import parse_model_spec

        for m in cfg.models:
            parse_model_spec(m)
        check_engine(cfg.engine, cfg.models)

    # 2. the judge and the api: models (a missing API key fails here, before any generation), then each -m in turn
    from rlhf_cli.api_client import Budget
    from rlhf_cli.api_generation import api_samplers
    from rlhf_cli.judges import build_judge

    judge = judge or build_judge(cfg.judge, cfg.judge_options)  # type: ignore[arg-type]
    samplers: dict[str, Any] = {}
    chosen: dict[str, tuple[int, list[list[float]]]] = {}  # --select: model -> (its first set, judge scores per instruction)
    try:
        shared = getattr(judge, "budget", None)  # an api judge's: one --max-cost for generating and judging
        samplers = api_samplers(cfg.models, _api_options(cfg.judge_options), cfg.seed, shared if isinstance(shared, Budget) else None)
        for m in cfg.models:
            outs = generate_outputs(m, [r.instruction for r in refs], cfg, samplers.get(m))
            if cfg.select:  # every one of the K outputs is judged: set j holds each instruction's j-th output
                chosen[m] = (len(sets), select_scores(cfg, refs, outs))
            sets += [(m, _ref_pairs(refs, [o[j] for o in outs], m)) for j in range(cfg.n)]

        # 3. judge every set in one stream (an api judge keeps --concurrency requests in flight across sets)
        judged, stopped = judge_sets(judge, [pairs for _, pairs in sets], cfg)
        desc = judge.describe()
    finally:
        for sampler in samplers.values():
            sampler.close()
        close = getattr(judge, "close", None)
        if close is not None:
            close()

    # 4. score each set (a --select model: the outputs its judge keeps), then the shared summary / table / sample log / plot
    results = []
    for s, ((label, pairs), verdicts) in enumerate(zip(sets, judged, strict=True)):
        if label in chosen and s != chosen[label][0]:
            continue  # a --select model's other sets: read through its first
        cost = sum(v.get("cost", 0.0) for v in verdicts)
        if label in chosen:
            first, scores = chosen[label]
            pairs, verdicts, cost, curve = best_of_sets(sets[first : first + cfg.n], judged[first : first + cfg.n], scores)
        pairs = [replace(p, preference=v["preference"]) for p, v in zip(pairs, verdicts, strict=True)]
        res = score_set(label, pairs, verdicts, difficulty, cfg.difficulty)
        res.extra.update(judge=desc, cost=cost, stopped=stopped)
        if label in chosen:
            res.metrics.update(curve)
            res.primary = f"best_of_{cfg.n}"
            res.extra["select"] = cfg.select
        results.append(res)
    if stopped:
        warn(f"the judge stopped early ({stopped}): unanswered pairs are left out of n; a rerun reuses cached verdicts")
    report(results, cfg.reference, cfg.log_samples, None if chosen else cfg.plot)  # type: ignore[arg-type]
    if chosen and cfg.plot:
        from rlhf_cli.evals.best_of import plot_curve

        plot_curve([r for r in results if r.model in chosen], cfg.plot, "win rate (%)")
    return results


def _ref_pairs(refs: list[Output], texts: list[str], model: str) -> list[Pair]:
    return [Pair(k, r.instruction, r.output, t, r.row, f"{model} on {r.where}") for k, (r, t) in enumerate(zip(refs, texts, strict=True))]


def score_set(label: str, pairs: list[Pair], verdicts: list[dict[str, Any]] | None,
              difficulty: dict[int, float] | None, difficulty_path: str | None) -> EvalResult:
    """Metrics and --log-samples rows for one candidate set."""
    prefs = [p.preference for p in pairs]
    stats = winrate_stats(prefs)
    diff = lookup_difficulty(difficulty, pairs, difficulty_path) if difficulty is not None else None
    lc = length_controlled(prefs, [len(p.candidate) for p in pairs], [len(p.reference) for p in pairs], diff)
    metrics = {
        "win_rate": stats["win_rate"], "win_rate_stderr": stats["standard_error"],
        "lc_win_rate": lc["lc_win_rate"], "lc_win_rate_stderr": lc["lc_standard_error"],
        "n_wins": stats["n_wins"], "n_draws": stats["n_draws"], "n_losses": stats["n_losses"],
        "avg_length": _mean([len(p.candidate) for p in pairs]), "ref_avg_length": _mean([len(p.reference) for p in pairs]),
    }
    samples = []
    for k, p in enumerate(pairs):
        row = {"id": p.index, "input": p.instruction, "output": p.candidate, "extracted": None, "target": p.reference,
               "score": None if p.preference is None else p.preference - 1.0, "preference": p.preference,
               "lc_preference": lc["predicted"][k]}
        if verdicts is not None:
            row["judge"] = {key: v for key, v in verdicts[k].items() if key != "preference"}
        samples.append(row)
    extra: dict[str, Any] = {"discrete_win_rate": stats["discrete_win_rate"], "n_dropped": stats["n_dropped"], "lc_weights": lc["weights"]}
    return EvalResult("winrate", label, metrics, int(stats["n_total"]), "win_rate", samples, extra)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


# ---------------------------------------------------------------------------------- generating and judging


def _api_options(opts: JudgeOptions) -> Any:
    from rlhf_cli.api_client import ApiOptions

    return ApiOptions(opts.base_url, opts.api_key_env, opts.concurrency, opts.max_retries, opts.timeout, opts.prices, opts.max_cost)


def generate_outputs(spec_str: str, instructions: list[str], cfg: WinrateConfig, sampler: Any = None) -> list[list[str]]:
    """-n outputs per instruction from MODEL: chat template, batched, seeded per batch (as `rlhf sample`);
    `sampler` (an ApiSampler) for an api: model, seeded per instruction."""
    from rlhf_cli.metrics import progress_bar

    prompts: list[Any] = [[{"role": "user", "content": ins}] for ins in instructions]
    keys = [str(k) for k in range(len(instructions))]
    if sampler is not None:
        got: Any = ((i, s.completions) for i, s in sampler.sample_all(prompts, keys, n=cfg.n, temperature=cfg.temperature,
                                                                       max_tokens=cfg.max_new_tokens, seed=cfg.seed))
    else:  # a local model (--engine): batched, each batch seeded by its indices
        from rlhf_cli.engines import local_completions
        from rlhf_cli.generation import SamplingParams

        opts = cfg.judge_options  # --batch-size, --device, --dtype serve the judge and -m alike
        params = SamplingParams(n=cfg.n, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        got = local_completions(spec_str, prompts, keys, params, batch_size=opts.batch_size, engine=cfg.engine, memory=cfg.engine_memory,
                                device=opts.device, dtype=opts.dtype, seed=cfg.seed, trust_remote_code=opts.trust_remote_code)
    texts: list[list[str]] = []
    with progress_bar(True) as bar:
        task = bar.add_task(f"generate {spec_str}", total=len(instructions), stats="")
        for _, comps in got:
            texts.append([c.text for c in comps])
            bar.update(task, advance=1)
    return texts


# ---------------------------------------------------------- the math (the LC GLM: length_control.py)


def winrate_stats(preferences: Sequence[float | None]) -> dict[str, float]:
    """AlpacaEval's head-to-head numbers (metrics/helpers.py `describe_head2head`, AbsoluteScoringRule).

    p in [1, 2]; 0 means a tie (legacy) and becomes 1.5; None / NaN is no answer and is left out of
    everything. y = p - 1: win_rate = 100 mean(y), standard_error = 100 sem(y) (ddof 1),
    n_wins = #(y > 0.5), n_losses = #(y < 0.5), n_draws = #(p == 1.5) (exactly: weighted preferences
    are rarely exactly 1.5), discrete_win_rate = 100 mean of y rounded to 0 / 0.5 / 1.
    """
    from rlhf_cli.evals.base import mean_stderr

    ps = [1.5 if p == 0 else float(p) for p in preferences if p is not None and not math.isnan(p)]
    y = [p - 1.0 for p in ps]
    win, se = mean_stderr(y)
    discrete = [0.5 if v == 0.5 else float(v > 0.5) for v in y]
    return {"win_rate": 100 * win, "standard_error": 100 * se, "discrete_win_rate": 100 * mean_stderr(discrete)[0],
            "n_wins": sum(v > 0.5 for v in y), "n_losses": sum(v < 0.5 for v in y), "n_draws": sum(p == 1.5 for p in ps),
            "n_total": len(y), "n_dropped": len(preferences) - len(y)}
