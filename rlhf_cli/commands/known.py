"""`rlhf known`: what does the base model already know? SliCK categories per QA row, before SFT.

Gekhman et al. 2024, "Does Fine-Tuning LLMs on New Knowledge Encourage Hallucinations?": facts the
model does not know are learned slowly in fine-tuning and, once learned, make it hallucinate more;
dropping the Unknown examples costs little. `--drop unknown` keeps that new knowledge out of an SFT set.

    rlhf known qa.jsonl -m base/ -n 8 --judge rule:exact --reference answer > qa.known.jsonl
    rlhf known sft.jsonl -m base/ --judge rule:contains --drop unknown | rlhf sft - -m base/ --out sft/

Per row: E few-shot prompts (S other rows' question/answer pairs each, `eval exact`'s layout), under
each one greedy answer and K samples. P0 = share of the E greedy answers the judge calls correct, P =
share of the E*K samples; `category(P0, P)` names the class.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, cast

import typer

from rlhf_cli.config import from_cli
from rlhf_cli.engines import ENGINES
from rlhf_cli.errors import RlhfError
from rlhf_cli.options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EngineMemoryOpt,
    EngineOpt,
    FormatOpt,
    ModelOpt,
    OutputOpt,
    SeedOpt,
    TrustOpt,
)

if TYPE_CHECKING:
    from rlhf_cli.data.jsonl import Line
    from rlhf_cli.generation import Completion, SamplingParams
    from rlhf_cli.judges.base import ScoreJudge

CATEGORIES = ("highly_known", "maybe_known", "weakly_known", "unknown")  # SliCK's four, most known first

Prompt = str | list[dict[str, str]]  # raw text, or chat turns (what `local_completions` takes)
# (prompts, keys, params) -> (prompt index, params.n completions): `engines.local_completions` without its options
Generate = Callable[[Sequence[Prompt], Sequence[str], "SamplingParams"], Iterable[tuple[int, list["Completion"]]]]


@dataclass(frozen=True)
class KnownConfig:
    data: str
    model: str = "builtin:tiny"
    n: int = 8  # K sampled answers per prompt; 0: greedy answers only
    temperature: float = 0.5  # the paper's sampling temperature
    shots: int = 4  # S exemplars per prompt (the paper's 4); 0: zero-shot, one prompt per row
    shot_sets: int = 4  # E prompts per row (the paper: 10)
    judge: str = "rule:exact"
    reference: str = "answer"
    threshold: float = 1.0  # a judge score >= this is a correct answer
    drop: tuple[str, ...] = ()  # categories left out of the output (comma-separated or repeated)
    max_new_tokens: int = 32
    stop: tuple[str, ...] | None = None  # None: eval exact's stops plus a newline for raw, none for chat
    batch_size: int = 8
    format: str = "chat"
    output: str = "-"
    plot: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    trust_remote_code: bool = False
    engine: str = "hf"
    engine_memory: float = 0.3

    COMMAND: ClassVar[str] = "known"
    FLAGS: ClassVar[dict[str, str]] = {"n": "-n"}
    LIMITS: ClassVar[dict[str, Any]] = {
        "n": ">= 0", "temperature": "> 0", "shots": ">= 0", "shot_sets": ">= 1", "max_new_tokens": ">= 1", "batch_size": ">= 1",
        "format": ("chat", "raw"), "dtype": ("fp32", "bf16", "fp16"), "engine": ENGINES, "engine_memory": "(0, 1]",
    }


def command(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="QA / SFT JSONL file, or '-' for stdin.", show_default=False)],
    model: ModelOpt = KnownConfig.model,
    n: Annotated[int, typer.Option("-n", "--n", help="Sampled answers per prompt (K); 0: greedy only (then weakly_known cannot be told from unknown).")] = KnownConfig.n,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature (the paper: 0.5).")] = KnownConfig.temperature,
    shots: Annotated[int, typer.Option("--shots", "-k", help="Other rows' Q/A pairs before each question (0: zero-shot).")] = KnownConfig.shots,
    shot_sets: Annotated[int, typer.Option("--shot-sets", help="Few-shot prompts per row, each with its own random exemplars (E).")] = KnownConfig.shot_sets,
    judge: Annotated[str, typer.Option("--judge", "-j", help="A score judge: rule:exact | rule:contains | rule:last-number | rule:regex:PATTERN | rule:FILE.py:FN | rm:PATH.")] = KnownConfig.judge,
    reference: Annotated[str, typer.Option("--reference", help="The row field holding the reference answer (else the completion / last assistant turn).")] = KnownConfig.reference,
    threshold: Annotated[float, typer.Option("--threshold", help="A judge score >= this counts as correct.")] = KnownConfig.threshold,
    drop: Annotated[list[str] | None, typer.Option("--drop", help="Leave rows of these categories out: e.g. unknown or unknown,weakly_known.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")] = KnownConfig.max_new_tokens,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable); replaces the default: eval exact's stops and a newline for raw, none for chat.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per generate call.")] = KnownConfig.batch_size,
    format: FormatOpt = KnownConfig.format,
    output: OutputOpt = KnownConfig.output,
    plot: Annotated[str | None, typer.Option("--plot", help="Bar chart of the rows per category (PNG).")] = KnownConfig.plot,
    seed: SeedOpt = KnownConfig.seed,
    device: DeviceOpt = KnownConfig.device,
    dtype: DtypeOpt = KnownConfig.dtype,
    trust_remote_code: TrustOpt = KnownConfig.trust_remote_code,
    engine: EngineOpt = KnownConfig.engine,
    engine_memory: EngineMemoryOpt = KnownConfig.engine_memory,
    config: ConfigOpt = None,
) -> None:
    """Label each QA row with what the base model knows (SliCK, Gekhman et al. 2024); --drop the unknown.

    Input rows: {"prompt", "completion"}, {"messages": [...]} ending in an assistant turn (the answer),
    or {"prompt"} / {"messages"} with a --reference field (which wins over the completion). Output
    (stdout or --output FILE, written only when every row is done): each row with every field kept,
    plus "known": {category, p_correct (P; null with -n 0), p_greedy (P0), greedy_correct (P0 >= 0.5),
    greedy_answer (under the first prompt), samples (E*K), prompts (E), model, judge}. A table of the
    categories goes to stderr. --drop leaves rows out; to keep every label and filter later:
    jq -c 'select(.known.category != "unknown")'.

    Each row gets E = --shot-sets few-shot prompts of --shots other rows' Q/A pairs; under each, one
    greedy answer and -n K samples at --temperature. P0 = share of greedy answers correct, P = share
    of samples correct:

      highly_known  P0 = 1          maybe_known  0 < P0 < 1

      weakly_known  P0 = 0, P > 0   unknown      P0 = 0, P = 0

    Examples:

      rlhf known qa.jsonl -m base/ -n 8 --judge rule:exact --reference answer > qa.known.jsonl

      rlhf known qa.jsonl -m base/ --judge rule:contains --drop unknown > qa.safe.jsonl

      rlhf known sft.jsonl -m base/ --drop unknown,weakly_known --plot known.png -o safe.jsonl

      rlhf known sft.jsonl -m base/ --judge rule:contains --drop unknown | rlhf sft - -m base/ --out sft/

      rlhf known qa.jsonl -m base/ --format raw --shot-sets 10 -n 16 -b 64 --engine vllm > qa.known.jsonl

      rlhf known test.jsonl -m sft/ --shots 0 -n 0 --judge rule:contains > answers.jsonl   # zero-shot greedy answers, judged
    """
    params = {**locals(), "drop": tuple(drop or ()), "stop": tuple(stop) if stop else None}
    run(from_cli(KnownConfig, ctx, params, config))


# --- the paper's categories (pure) ----------------------------------------------------------------


def category(p_greedy: float, p_sampled: float) -> str:
    """SliCK (Sampling-based Categorization of Knowledge, Gekhman et al. 2024) from the two P_Correct
    estimates of one (question, answer) pair.

    p_greedy: P0, the share of greedy (T = 0) answers that are correct over the few-shot prompts.
    p_sampled: P, the share of sampled (T > 0) answers that are correct over the same prompts.

        highly_known  P0 == 1              the greedy answer is always right
        maybe_known   0 < P0 < 1           the greedy answer is sometimes right
        weakly_known  P0 == 0 and P > 0    never greedily, but some sample is right
        unknown       P0 == 0 and P == 0   never right at all
    """
    if p_greedy >= 1.0:
        return "highly_known"
    if p_greedy > 0.0:
        return "maybe_known"
    return "weakly_known" if p_sampled > 0.0 else "unknown"


def drop_categories(drop: Sequence[str]) -> set[str]:
    """--drop values ("unknown,weakly_known", or repeated) -> the set of categories; unknown names are an error."""
    names = {c.strip() for d in drop for c in d.split(",") if c.strip()}
    bad = sorted(names - set(CATEGORIES))
    if bad:
        raise RlhfError(f"--drop {','.join(bad)}: not a category", f"categories: {', '.join(CATEGORIES)}")
    return names


def shot_indices(n_rows: int, excluded: AbstractSet[int], shots: int, seed: int, key: str, set_index: int) -> list[int]:
    """`shots` distinct rows of `n_rows` for one prompt, drawn by a generator seeded by (seed, row key,
    set index). `excluded`: the row itself and every row asking the same question (an exemplar that
    is the question would hand the model its answer)."""
    free = n_rows - len(excluded)
    if free < shots:
        raise RlhfError(f"only {free} other rows ask a different question, fewer than --shots {shots}", "lower --shots or add rows")
    rng = random.Random(f"{seed}|{key}|{set_index}")
    if free < 4 * shots:  # few candidates: draw from the list of them
        return rng.sample([j for j in range(n_rows) if j not in excluded], shots)
    chosen: list[int] = []  # many: redraw the rare excluded or repeated index, O(shots) per prompt for any file size
    while len(chosen) < shots:
        j = rng.randrange(n_rows)
        if j not in excluded and j not in chosen:
            chosen.append(j)
    return chosen


# --- input ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QaRow:
    """One validated row: its question as text (and as turns, for messages rows) and its reference."""

    key: str  # seeds the exemplars and the samples: the row's id, else its position
    question: str
    messages: tuple[dict[str, str], ...] | None
    reference: Any  # as the judge reads it: a string, a number, or a list of them (any one is right)
    data: dict[str, Any]  # the input row, passed through
    where: str


def parse_row(line: Line, index: int, field: str) -> QaRow:
    """A QA row from an SFT row or a prompt row with a reference field, naming `file:line` on failure.
    A conversation's turns before its answer are the question: a lone user turn as it is, longer ones
    as "Role: content" text (`render_messages`), which both prompt layouts can show."""
    from rlhf_cli.data.records import parse_messages, render_messages

    d, where = line.data, line.where
    messages: tuple[dict[str, str], ...] | None = None
    answer: Any = None
    if "messages" in d:
        turns = parse_messages(line)
        if turns[-1]["role"] == "assistant":  # an SFT conversation: its last turn is the answer
            turns, answer = turns[:-1], turns[-1]["content"]
        messages = turns
        question = render_messages(turns) if turns else ""
    elif "prompt" in d:
        question, answer = d["prompt"], d.get("completion")
        if not isinstance(question, str):
            raise RlhfError(f"{where}: field 'prompt' must be a string, got {type(question).__name__}")
    else:
        raise RlhfError(f"{where}: no 'prompt' or 'messages' field", 'expected {"prompt", "completion"}, {"messages": [...]} or {"prompt", "answer"}')
    if field in d:
        answer = d[field]
    if not question.strip():
        raise RlhfError(f"{where}: the question is empty", "give the prompt (or the turns before the answer) some text")
    if not _usable_reference(answer):
        raise RlhfError(f"{where}: no reference answer (no '{field}' field, completion or final assistant turn)",
                        f"add the answer as '{field}', or name its field with --reference FIELD")
    return QaRow(str(d.get("id", index)), question, messages, answer, d, where)


def _usable_reference(ref: Any) -> bool:
    """A non-blank string, a number, or a non-empty list of those (a rule judge accepts any entry)."""
    if isinstance(ref, list):
        return bool(ref) and all(not isinstance(r, list) and _usable_reference(r) for r in ref)
    return bool(ref.strip()) if isinstance(ref, str) else isinstance(ref, (int, float)) and not isinstance(ref, bool)


def few_shot_prompts(rows: list[QaRow], cfg: KnownConfig) -> tuple[list[Prompt], list[str]]:
    """E prompts per row (row i's prompt e at i*E + e) in eval exact's layout, and their seed keys."""
    from rlhf_cli.evals.exact import Problem, build_prompt

    asking: dict[str, set[int]] = {}  # question -> the rows asking it
    for i, r in enumerate(rows):
        asking.setdefault(r.question, set()).add(i)
    # an exemplar shows a list reference's first entry, a number as written
    shown = [Problem(r.key, r.question, str(r.reference[0] if isinstance(r.reference, list) else r.reference).strip(), "") for r in rows]
    prompts: list[Prompt] = []
    keys: list[str] = []
    for r in rows:
        for e in range(prompts_per_row(cfg)):
            try:
                shots = [shown[j] for j in shot_indices(len(rows), asking[r.question], cfg.shots, cfg.seed, r.key, e)]
            except RlhfError as err:
                raise RlhfError(f"{r.where}: {err.message}", err.hint) from None
            prompts.append(build_prompt(r.question, shots, cfg.format))
            keys.append(f"{r.key}|{e}")
    return prompts, keys


def prompts_per_row(cfg: KnownConfig) -> int:
    return cfg.shot_sets if cfg.shots else 1  # zero-shot prompts are all the same prompt


# --- run ------------------------------------------------------------------------------------------


def validate(cfg: KnownConfig) -> set[str]:
    """Ranges, --drop, the model and the judge kind, before anything is read; -> the categories to drop."""
    from rlhf_cli.config import check
    from rlhf_cli.engines import check_engine
    from rlhf_cli.models.loading import parse_model_spec

    check(cfg)
    drop = drop_categories(cfg.drop)
    if parse_model_spec(cfg.model).kind == "api":
        raise RlhfError(f"--model {cfg.model}: known runs the model itself (greedy and sampled answers under the same prompts)",
                        "give a local model: an HF directory, a hub id, a .gguf file or builtin:tiny")
    check_engine(cfg.engine, [cfg.model])
    if cfg.judge.partition(":")[0] in ("lm", "api", "human"):  # before build_judge: lm: would load its model
        raise RlhfError(f"--judge {cfg.judge}: known needs a score judge (one verdict per answer), and "
                        f"{cfg.judge.partition(':')[0]} judges compare pairs", "use rule:exact, rule:contains, rule:FILE.py:FN or rm:PATH")
    return drop


def run(cfg: KnownConfig, generate: Generate | None = None) -> dict[str, Any]:
    """Label every row, write the rows kept, show the table; -> the summary. `generate` replaces the
    local model (tests inject answers fixed by construction)."""
    from rlhf_cli.data.jsonl import JsonlSink, read_jsonl, write_jsonl_atomic
    from rlhf_cli.data.records import Item
    from rlhf_cli.engines import local_passes
    from rlhf_cli.evals.exact import STOP
    from rlhf_cli.generation import SamplingParams
    from rlhf_cli.judges import JudgeOptions, build_judge
    from rlhf_cli.metrics import progress_bar

    # 1. everything cheap first: options, rows, exemplars, the judge
    drop = validate(cfg)
    rows = [parse_row(line, i, cfg.reference) for i, line in enumerate(read_jsonl(cfg.data))]
    if cfg.shots and len(rows) < cfg.shots + 1:
        raise RlhfError(f"{cfg.data}: {len(rows)} rows; --shots {cfg.shots} needs at least {cfg.shots + 1} (the exemplars are other rows)",
                        f"lower --shots (at most {len(rows) - 1}), or --shots 0 for zero-shot prompts")
    prompts, keys = few_shot_prompts(rows, cfg)
    judge = cast("ScoreJudge", build_judge(cfg.judge, JudgeOptions(  # validate() refused the pair judges
        reference_field=cfg.reference, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
        trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)))
    n_sets = prompts_per_row(cfg)

    # 2. answers: one greedy call and one sampled call over all rows x prompts, so batches stay full
    stop = cfg.stop if cfg.stop is not None else ((*STOP, "\n") if cfg.format == "raw" else ())
    passes = (SamplingParams(1, 0.0, 1.0, 0, cfg.max_new_tokens, cfg.seed, stop),  # greedy
              SamplingParams(cfg.n, cfg.temperature, 1.0, 0, cfg.max_new_tokens, cfg.seed, stop))[: 2 if cfg.n else 1]  # sampled
    if generate is None:  # the model loads once for both passes
        got: Iterable[tuple[int, int, list[Completion]]] = local_passes(
            cfg.model, prompts, keys, passes, batch_size=cfg.batch_size, engine=cfg.engine, memory=cfg.engine_memory,
            device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    else:
        got = ((k, i, comps) for k, params in enumerate(passes) for i, comps in generate(prompts, keys, params))
    texts: list[list[list[str]]] = [[[] for _ in prompts] for _ in passes]  # [greedy, sampled] -> per prompt, its answers
    with progress_bar(True) as bar:
        tasks = [bar.add_task(f"known {name}", total=len(prompts), stats="") for name in ("greedy", "sampled")[: len(passes)]]
        for k, i, comps in got:
            texts[k][i] = [c.text.strip() for c in comps]
            bar.update(tasks[k], advance=1)
    for name, params, t in zip(("greedy", "sampled")[: len(passes)], passes, texts, strict=True):
        if any(len(x) != params.n for x in t):
            raise RuntimeError(f"the {name} generator did not answer every prompt {params.n} time(s)")
    # per pass, per row: its answers prompt by prompt
    answers = [[[a for x in t[i * n_sets : (i + 1) * n_sets] for a in x] for i in range(len(rows))] for t in texts]

    # 3. judge: each row's E greedy answers, then (a second item) its E*K samples
    # the judge reads the reference from row[--reference]: an SFT row's is its completion or last turn
    items = [Item(r.key, r.question, tuple(got[i]), {**r.data, cfg.reference: r.reference}, r.messages, r.where)
             for got in answers for i, r in enumerate(rows)]
    correct: list[list[bool]] = []
    for item, scores in zip(items, judge.score(items), strict=True):
        if any(x is None for x in scores):  # counting it as wrong would quietly move the row towards unknown
            raise RlhfError(f"{item.where}: --judge {cfg.judge} could not score an answer", "check the reference field and the judge")
        correct.append([x is not None and x >= cfg.threshold for x in scores])

    # 4. categories, the rows kept, the table
    out_rows, cats, p_all = [], [], []
    for i, r in enumerate(rows):
        g, s = correct[i], (correct[len(rows) + i] if cfg.n else [])
        p0, p = sum(g) / len(g), (sum(s) / len(s) if s else None)
        cats.append(category(p0, p or 0.0))  # -n 0: no samples, so P0 = 0 is unknown
        p_all.append(p0 if p is None else p)
        if cats[-1] not in drop:
            out_rows.append({**r.data, "known": {"category": cats[-1], "p_correct": p, "p_greedy": p0, "greedy_correct": p0 >= 0.5,
                                                 "greedy_answer": answers[0][i][0], "samples": len(s), "prompts": n_sets,
                                                 "model": cfg.model, "judge": judge.describe()}})
    if cfg.output == "-":
        with JsonlSink("-") as sink:
            for row in out_rows:
                sink.write(row)
    else:
        write_jsonl_atomic(cfg.output, out_rows)  # all or nothing: no half-written file
    counts = {c: cats.count(c) for c in CATEGORIES}
    summary = {"rows": len(rows), "written": len(out_rows), "dropped": len(rows) - len(out_rows), "categories": counts,
               "mean_p_correct": sum(p_all) / len(p_all), "mean_of": "p_correct" if cfg.n else "p_greedy"}
    if cfg.plot:
        plot_categories(counts, cfg.plot, cfg.model)
    show_summary(summary, cfg.data)
    return summary


def show_summary(s: dict[str, Any], data: str) -> None:
    """Rows and share per category, what was written and dropped, mean P, on stderr."""
    from rich.table import Table

    from rlhf_cli.console import err

    t = Table("category", "rows", "share", title=f"rlhf known: {data}")
    for c, k in s["categories"].items():
        t.add_row(c, str(k), f"{100 * k / s['rows']:.1f}%")
    t.add_section()
    t.add_row("written / dropped", f"{s['written']} / {s['dropped']}", "")
    t.add_row(f"mean {s['mean_of']}", f"{s['mean_p_correct']:.3f}", "")
    err.print(t)


def plot_categories(counts: dict[str, int], path: str, model: str) -> None:
    """Bar chart of the rows per category, most known first; atomic PNG (as evals/base.py plot_results)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from rlhf_cli.data.jsonl import atomic_file

    total = sum(counts.values()) or 1
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.bar(list(counts), list(counts.values()), color=["#4C72B0", "#55A868", "#DD8452", "#C44E52"])
    ax.set_ylabel("rows")
    ax.set_title(f"rlhf known: {model}")
    for i, v in enumerate(counts.values()):
        ax.annotate(f"{v} ({100 * v / total:.0f}%)", (i, v), ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    fig.tight_layout()
    with atomic_file(path) as f:  # a failed savefig leaves no file behind
        fig.savefig(f, format="png", dpi=100)
