"""`rlhf eval exact`: generate, extract the answer, compare with the reference (GSM8K style).

Reads GSM8K rows `{"question", "answer": "... #### 72"}` directly, our prompt rows
`{"prompt", "answer"}`, or any JSONL through `--field question=COL --field answer=COL`.

    rlhf eval exact gsm8k/test.jsonl -m sft/ --shots 8 --fewshot gsm8k/train.jsonl
    rlhf eval exact test.jsonl -m base/ -m sft/ -m ppo/ --extract exact --max-new-tokens 8 --plot toy.png
    rlhf eval exact gsm8k/test.jsonl -m sft/ -n 8 --temperature 0.7        # majority vote over 8 samples
    rlhf eval exact gsm8k/test.jsonl -m api:qwen --base-url http://127.0.0.1:8000/v1 --format chat
    rlhf eval exact gsm8k/test.jsonl -m sft/ -m ppo/ --engine vllm -b 64  # local models served by in-process vLLM

Prompt (raw format, lm-evaluation-harness's `gsm8k` task): k solved examples then the question, each
"Question: {question}\\nAnswer: {answer}" joined by a blank line, ending in "Answer:"; generation stops
where lm-eval's does: at "Question:", "</s>" or "<|im_end|>" (and the model's EOS). Chat format
(`--format chat`) sends each shot as a user / assistant turn instead (the bare question as the user
turn) and stops at end of turn. `--question-template` sets the question's text in both formats: with
`--format chat --question-template 'Question: {question}\\nAnswer:'` the turns are exactly lm-eval's
`--apply_chat_template --fewshot_as_multiturn`. `--stop` replaces the stop strings.

Extraction (`--extract`): `gsm8k` (the `#### N` line, else the last number), `strict` and `flexible`
(lm-eval's two gsm8k filters with its own regular expressions: the first "#### N", or the last
number-like run), `last-number`, `regex:PATTERN` (group 1 if any), `exact` (the whole answer, normalised). Numbers compare as numbers (1,000 == 1000.0; lm-eval compares
strings after dropping "$", "," and a final ".", so "18.00" != "18" there: rare in practice).

`-m api:MODEL` asks an OpenAI-compatible server (rlhf_cli/api_generation.py): raw prompts go to
/completions, chat turns to /chat/completions, one request per question (seeded by its id) with
--concurrency in flight; a --max-cost stop exits 3 with nothing scored.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.api_client import ApiOptions
from rlhf_cli.config import from_cli
from rlhf_cli.engines import ENGINES
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals.base import EvalResult, FieldOpt, LimitOpt, LogSamplesOpt, ModelsOpt, PlotOpt, mean_stderr, parse_fields
from rlhf_cli.evals.best_of import SelectOpt
from rlhf_cli.options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EngineMemoryOpt,
    EngineOpt,
    FormatOpt,
    ModelApiKeyEnvOpt,
    ModelBaseUrlOpt,
    ModelConcurrencyOpt,
    ModelMaxCostOpt,
    ModelPricesOpt,
    SeedOpt,
    TrustOpt,
    deprecated,
)

FIELDS = ("question", "answer", "id")
STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval gsm8k's `until`, for the raw format
TEMPLATES = {"raw": "Question: {question}\nAnswer:", "chat": "{question}"}  # lm-eval gsm8k's doc_to_text; a bare chat turn
# lm-eval gsm8k's filters (tasks/gsm8k/gsm8k.yaml): strict-match takes the first "#### N", flexible-extract
# the last number-like run; both then ignore "$", "," and a final "." when comparing.
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
API = ApiOptions()


@dataclass(frozen=True)
class ExactConfig:
    data: str
    models: tuple[str, ...] = ()
    shots: int = 0
    fewshot: str | None = None
    extract: str = "gsm8k"
    format: str = "raw"
    n: int = 1
    select: str | None = None  # with n > 1: a score judge picks each question's answer (best-of-n), else a majority vote
    temperature: float = 0.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] | None = None  # None: lm-eval's gsm8k stops for raw, none for chat
    question_template: str | None = None  # {question} is replaced, a typed \\n is a newline; None: TEMPLATES
    batch_size: int = 16
    limit: int | None = None
    fields: tuple[str, ...] = ()  # NAME=COLUMN, as --field
    log_samples: str | None = None
    plot: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    trust_remote_code: bool = False
    engine: str = "hf"  # local models: hf = generation.generate, vllm = an in-process vLLM engine
    engine_memory: float = 0.3
    api: ApiOptions = API  # -m api:MODEL only; max_retries and timeout from --config

    COMMAND: ClassVar[str] = "eval exact"
    FLAGS: ClassVar[dict[str, str]] = {"n": "-n", "models": "--model", "fields": "--field"}
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"max_retries", "timeout"})
    LIMITS: ClassVar[dict[str, Any]] = {
        "shots": ">= 0", "format": ("chat", "raw"), "n": ">= 1", "temperature": ">= 0", "max_new_tokens": ">= 1",
        "batch_size": ">= 1", "limit": ">= 1", "dtype": ("fp32", "bf16", "fp16"), "engine": ENGINES, "engine_memory": "(0, 1]",
    }


@dataclass(frozen=True)
class Problem:
    id: Any
    question: str
    answer: str  # the reference as written (a GSM8K solution or a bare answer)
    target: str  # the extracted reference answer


def command(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="JSONL with a question and a reference answer per row, or '-'.", show_default=False)],
    models: ModelsOpt = None,  # type: ignore[assignment]
    shots: Annotated[int, typer.Option("--shots", "-k", help="Solved examples before each question (from --fewshot).")] = ExactConfig.shots,
    fewshot: Annotated[str | None, typer.Option("--fewshot", help="File of solved examples for --shots (its first k rows).")] = ExactConfig.fewshot,
    extract: Annotated[str, typer.Option("--extract", help="gsm8k | strict | flexible | last-number | exact | regex:PATTERN.")] = ExactConfig.extract,
    format: FormatOpt = ExactConfig.format,
    n: Annotated[int, typer.Option("-n", "--n", help="Samples per question; > 1 takes the majority answer (or the --select judge's).")] = ExactConfig.n,
    select: SelectOpt = ExactConfig.select,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy (default with -n 1).")] = ExactConfig.temperature,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")] = ExactConfig.max_new_tokens,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable); replaces the default: lm-eval's gsm8k stops for raw, none for chat.")] = None,
    question_template: Annotated[str | None, typer.Option("--question-template", help="The question's text: {question} is replaced, \\\\n is a newline. Default 'Question: {question}\\\\nAnswer:' for raw, '{question}' for chat.")] = ExactConfig.question_template,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Questions per generate call.")] = ExactConfig.batch_size,
    limit: LimitOpt = ExactConfig.limit,
    fields: FieldOpt = None,
    log_samples: LogSamplesOpt = ExactConfig.log_samples,
    plot: PlotOpt = ExactConfig.plot,
    seed: SeedOpt = ExactConfig.seed,
    device: DeviceOpt = ExactConfig.device,
    dtype: DtypeOpt = ExactConfig.dtype,
    trust_remote_code: TrustOpt = ExactConfig.trust_remote_code,
    engine: EngineOpt = ExactConfig.engine,
    engine_memory: EngineMemoryOpt = ExactConfig.engine_memory,
    base_url: ModelBaseUrlOpt = API.base_url,
    api_key_env: ModelApiKeyEnvOpt = API.api_key_env,
    concurrency: ModelConcurrencyOpt = API.concurrency,
    prices: ModelPricesOpt = API.prices,
    max_cost: ModelMaxCostOpt = API.max_cost,
    config: ConfigOpt = None,
    deprecated_template: Annotated[str | None, typer.Option("--template", hidden=True, help="Deprecated spelling of --question-template.")] = None,
) -> None:
    """Exact match after answer extraction (GSM8K style): generate, extract, compare.

    Prints one JSON line {"kind": "exact", "results": [{"model", "n", "exact_match", "exact_match_stderr",
    ...}]} and a table on stderr. With -n > 1: majority vote ("exact_match") and the mean accuracy of
    single samples ("sample_accuracy"). With -n K --select JUDGE: best_of_1, 2, 4 ... K, the accuracy
    of the answer the judge scores highest among n samples (--plot draws that curve). -m api:MODEL generates on an OpenAI-compatible server
    (--base-url; exit 3 at --max-cost, nothing scored). --engine vllm generates with in-process vLLM
    (pip install 'rlhf-cli[vllm]').

    Examples:

      rlhf eval exact gsm8k/test.jsonl -m sft/ --shots 8 --fewshot gsm8k/train.jsonl

      rlhf eval exact test.jsonl -m base/ -m sft/ -m ppo/ --extract exact --max-new-tokens 8

      rlhf eval exact gsm8k/test.jsonl -m sft/ -n 8 --temperature 0.7 --log-samples gsm8k-samples.jsonl

      rlhf eval exact gsm8k/test.jsonl -m sft/ --format chat --question-template 'Question: {question}\\\\nAnswer:'

      rlhf eval exact test.jsonl -m sft/ -n 8 --temperature 1 --select rm:rm/ --plot best_of_n.png

      rlhf eval exact gsm8k/test.jsonl -m sft/ --config gsm8k.yaml   # shots, fewshot, extract ...

      rlhf eval exact gsm8k/test.jsonl -m api:gpt-4o-mini --format chat --max-cost 1 --limit 200
    """
    params = {**locals(), "models": tuple(models or ()), "stop": tuple(stop) if stop else None, "fields": tuple(fields or ())}
    fixed = {"question_template": deprecated("--template", "--question-template", deprecated_template)} if deprecated_template else {}
    run(from_cli(ExactConfig, ctx, params, config, **fixed))


# --- extraction and comparison (pure) -------------------------------------------------------------


def extractor(spec: str):
    """--extract value -> fn(text) -> str | None (the answer as a string)."""
    from rlhf_cli.judges.rule import gsm8k_number, last_number

    if spec == "gsm8k":
        return lambda t: _num(gsm8k_number(t))
    if spec == "last-number":
        return lambda t: _num(last_number(t))
    if spec == "strict":
        return lambda t: _lm_eval_number(_STRICT.search(t))
    if spec == "flexible":
        return lambda t: _lm_eval_number(next(reversed(list(_FLEXIBLE.finditer(t))), None))
    if spec == "exact":
        return lambda t: t.strip()
    if spec.startswith("regex:"):
        try:
            rx = re.compile(spec[len("regex:"):])
        except re.error as e:
            raise RlhfError(f"--extract {spec}: bad regular expression ({e})") from None

        def by_regex(t: str) -> str | None:
            found = rx.findall(t)
            if not found:
                return None
            last = found[-1]
            return (last[0] if isinstance(last, tuple) else last).strip()

        return by_regex
    raise RlhfError(f"--extract {spec!r}: unknown", "use gsm8k, strict, flexible, last-number, exact or regex:PATTERN")


def _num(d: Decimal | None) -> str | None:
    return None if d is None else format(d.normalize(), "f")


def _lm_eval_number(m: re.Match | None) -> str | None:
    """The matched group as lm-eval's gsm8k metric sees it: "$", "," and one final "." dropped."""
    if m is None:
        return None
    got = next(g for g in m.groups() if g)
    got = got.replace("$", "").replace(",", "")
    return got[:-1] if got.endswith(".") else got


def is_correct(extracted: str | None, target: str) -> bool:
    from rlhf_cli.judges.rule import same_answer

    return extracted is not None and same_answer(extracted, target)


def majority(answers: list[str | None]) -> str | None:
    """Most common extracted answer (None never wins while any answer exists; first seen on ties)."""
    from rlhf_cli.judges.rule import normalise

    counts = Counter(normalise(a) for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[normalise(a)] == best)


def build_prompt(question: str, shots: list[Problem], fmt: str, template: str | None = None) -> str | list[dict[str, str]]:
    """lm-eval's gsm8k layout in raw format (shots "{text} {answer}" joined by a blank line); alternating
    user / assistant turns in chat format. `template` renders each question ({question})."""
    tpl = template or TEMPLATES[fmt]

    def fill(q: str) -> str:
        return tpl.replace("{question}", q)

    if fmt == "chat":
        msgs: list[dict[str, str]] = []
        for s in shots:
            msgs += [{"role": "user", "content": fill(s.question)}, {"role": "assistant", "content": s.answer}]
        return [*msgs, {"role": "user", "content": fill(question)}]
    return "\n\n".join([*(f"{fill(s.question)} {s.answer}" for s in shots), fill(question)])


# --- data -----------------------------------------------------------------------------------------


def load_problems(path: str, fields: dict[str, str], extract: Any, limit: int | None = None) -> list[Problem]:
    from rlhf_cli.data.jsonl import read_jsonl

    qkey, akey, ikey = fields.get("question"), fields.get("answer", "answer"), fields.get("id", "id")
    out: list[Problem] = []
    for i, line in enumerate(read_jsonl(path)):
        if limit is not None and len(out) >= limit:
            break
        d = line.data
        key = qkey or ("question" if "question" in d else "prompt")
        q, a = d.get(key), d.get(akey)
        if not isinstance(q, str) or not q.strip():
            raise RlhfError(f"{line.where}: no question text in field '{key}'", "map it with --field question=COLUMN")
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str) or not a.strip():
            raise RlhfError(f"{line.where}: no reference answer in field '{akey}'", "map it with --field answer=COLUMN")
        target = extract_target(a, extract)
        if target is None:
            raise RlhfError(f"{line.where}: no answer could be extracted from the reference {a[-60:]!r}", "check --extract")
        out.append(Problem(d.get(ikey, i), q, a, target))
    return out


def extract_target(answer: str, extract: Any) -> str | None:
    """The reference's answer: GSM8K's `#### N`, else the extraction applied to it, else the text."""
    from rlhf_cli.judges.rule import gsm8k_number

    if "####" in answer:
        return _num(gsm8k_number(answer))
    got = extract(answer)
    return got if got is not None else answer.strip()


# --- run ------------------------------------------------------------------------------------------


def validate(cfg: ExactConfig) -> dict[str, str]:
    """Ranges and option combinations; returns the --field mapping."""
    from rlhf_cli.config import check

    check(cfg)
    if not cfg.models:
        raise RlhfError("give at least one --model")
    if cfg.shots and not cfg.fewshot:
        raise RlhfError(f"--shots {cfg.shots} needs --fewshot FILE", "e.g. --fewshot gsm8k/train.jsonl")
    if cfg.question_template is not None and "{question}" not in cfg.question_template:
        raise RlhfError(f"--question-template {cfg.question_template!r} has no {{question}}",
                        "e.g. --question-template 'Question: {question}\\nAnswer:'")
    if cfg.n > 1 and cfg.temperature == 0:
        raise RlhfError("-n > 1 with --temperature 0 gives n identical answers", "use a temperature > 0 for a majority vote")
    if cfg.select and cfg.n < 2:
        raise RlhfError("--select chooses among samples: it needs -n K >= 2", "e.g. -n 8 --temperature 1 --select rm:rm/")
    return parse_fields(list(cfg.fields), FIELDS)


def run(cfg: ExactConfig) -> list[EvalResult]:
    from rlhf_cli.api_generation import api_samplers
    from rlhf_cli.engines import check_engine
    from rlhf_cli.evals.base import report
    from rlhf_cli.evals.best_of import plot_curve, select_judge
    from rlhf_cli.models.loading import parse_model_spec

    # 1. everything cheap first: options, extraction rule, data, shots
    fields = validate(cfg)
    extract = extractor(cfg.extract)
    problems = load_problems(cfg.data, fields, extract, cfg.limit)
    shots = load_problems(cfg.fewshot, fields, extract, cfg.shots) if cfg.shots and cfg.fewshot else []  # validate: shots need fewshot
    if len(shots) < cfg.shots:
        raise RlhfError(f"{cfg.fewshot}: {len(shots)} rows, fewer than --shots {cfg.shots}")
    template = cfg.question_template.replace("\\n", "\n") if cfg.question_template else None  # a typed \\n is a newline
    prompts = [build_prompt(p.question, shots, cfg.format, template) for p in problems]
    for m in cfg.models:
        parse_model_spec(m)
    check_engine(cfg.engine, cfg.models)
    judge = select_judge(cfg.select, cfg.device, cfg.dtype, cfg.batch_size, cfg.seed, cfg.trust_remote_code) if cfg.select else None
    samplers = api_samplers(cfg.models, cfg.api, cfg.seed)  # api: models checked (key, URL, prices) before any model runs

    # 2. each model in turn
    try:
        results = [evaluate(cfg, model, problems, prompts, extract, samplers.get(model), judge) for model in cfg.models]
    finally:
        for sampler in samplers.values():
            sampler.close()
        if judge is not None:
            judge.close()
    report(results, cfg.data, cfg.log_samples, None if judge else cfg.plot)
    if judge is not None and cfg.plot:
        plot_curve(results, cfg.plot, "exact match")
    return results


def evaluate(cfg: ExactConfig, model_spec: str, problems: list[Problem], prompts: list[Any], extract: Any,
             sampler: Any = None, judge: Any = None) -> EvalResult:
    """Score one model: `sampler` (an ApiSampler) for an api: model, else the model is loaded here;
    `judge` (--select) scores every sample for the best-of-n curve."""
    from rlhf_cli.metrics import progress_bar

    stop = cfg.stop if cfg.stop is not None else (STOP if cfg.format == "raw" else ())
    answers = _api_answers(cfg, sampler, problems, prompts, stop) if sampler else _local_answers(cfg, model_spec, problems, prompts, stop)
    votes: list[float] = []
    singles: list[float] = []
    samples: list[dict[str, Any]] = []
    correct: dict[int, list[float]] = {}  # question index -> 1.0 / 0.0 per sample
    with progress_bar(True) as bar:
        task = bar.add_task(f"exact {model_spec}", total=len(problems), stats="")
        for i, texts in answers:
            p, prompt = problems[i], prompts[i]
            outputs = [t.strip() for t in texts]
            found = [extract(o) for o in outputs]
            voted = majority(found)
            score = float(is_correct(voted, p.target))
            votes.append(score)
            correct[i] = [float(is_correct(a, p.target)) for a in found]
            singles.extend(correct[i])
            samples.append({"id": p.id, "input": prompt, "output": outputs[0] if cfg.n == 1 else outputs,
                            "extracted": voted if cfg.n == 1 else {"votes": found, "majority": voted},
                            "target": p.target, "score": score})
            bar.update(task, advance=1, stats=f"exact match {sum(votes) / len(votes):.3f}")
    em, em_se = mean_stderr(votes)
    metrics = {"exact_match": em, "exact_match_stderr": em_se}
    if cfg.n > 1:
        acc, acc_se = mean_stderr(singles)
        metrics.update({"sample_accuracy": acc, "sample_accuracy_stderr": acc_se})
    extra: dict[str, Any] = {"shots": cfg.shots, "extract": cfg.extract, "samples_per_question": cfg.n}
    result = EvalResult("exact", model_spec, metrics, len(problems), "exact_match", samples, extra)
    if judge is not None:  # best-of-n: the judge's favourite among n of the K samples, n = 1, 2, 4 ... K
        from rlhf_cli.evals.best_of import add_best_of, kept_index

        order = list(correct)  # question indices, in the order of `samples`
        scores = add_best_of(result, judge, [problems[k].question for k in order], [s["output"] for s in samples],
                             [{"answer": problems[k].answer} for k in order], [correct[k] for k in order])
        for s, sc in zip(samples, scores, strict=True):
            s["select"] = {"scores": sc, "kept": kept_index(sc)}
    return result


def _local_answers(cfg: ExactConfig, model_spec: str, problems: list[Problem], prompts: list[Any],
                   stop: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(question index, n texts) from a local model (--engine), batch by batch, each batch seeded by its ids."""
    from rlhf_cli.engines import local_completions
    from rlhf_cli.generation import SamplingParams

    params = SamplingParams(cfg.n, cfg.temperature, 1.0, 0, cfg.max_new_tokens, cfg.seed, stop)
    got = local_completions(model_spec, prompts, [str(p.id) for p in problems], params, batch_size=cfg.batch_size, engine=cfg.engine,
                            memory=cfg.engine_memory, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    for k, comps in got:
        yield k, [c.text for c in comps]


def _api_answers(cfg: ExactConfig, sampler: Any, problems: list[Problem], prompts: list[Any],
                 stop: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(question index, n texts) from an api: model, in question order."""
    got = sampler.sample_all(prompts, [str(p.id) for p in problems], n=cfg.n, temperature=cfg.temperature,
                             max_tokens=cfg.max_new_tokens, stop=stop, seed=cfg.seed)
    for i, sampled in got:
        yield i, [c.text for c in sampled.completions]
