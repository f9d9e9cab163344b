"""`rlhf sample`: draw K completions per prompt (the candidates that `pairwise` compares).

Reads prompt rows `{"prompt"}` or `{"messages": [...]}` (every other field passes through) and
streams one JSONL row per prompt to stdout as each batch finishes.

    rlhf sample prompts.jsonl --model sft/ -n 4 > samples.jsonl
    rlhf sample prompts.jsonl --model sft/ -n 4 -o samples.jsonl --resume   # continue a killed run
    cat prompts.jsonl | rlhf sample - --model sft/ --temperature 0 | head -1
    OPENAI_API_KEY=... rlhf sample prompts.jsonl --model api:gpt-4o-mini -n 4 --max-cost 1 -o samples.jsonl
    rlhf sample prompts.jsonl --model api:qwen --base-url http://127.0.0.1:8000/v1 -n 4 > samples.jsonl
    rlhf sample prompts.jsonl --model sft/ -n 8 -b 64 --engine vllm > samples.jsonl

`--engine vllm` samples with an in-process vLLM engine (rlhf_cli/engines/) instead of our sampler:
the same rows, with `sampling.engine` added; greedy completions agree, sampled ones come from vLLM's RNG.

`--model api:MODEL` samples from an OpenAI-compatible server instead (rlhf_cli/api_generation.py):
requests run --concurrency at a time and rows still come out in input order; a --max-cost stop
writes every finished row and exits 3, and `--resume` continues. The rows have the same fields,
with `sampling.base_url` added; with --logprobs there are no `completion_token_ids` (the API gives
none) and the log-probs are the server's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.api_client import ApiOptions
from rlhf_cli.config import from_cli
from rlhf_cli.console import info
from rlhf_cli.engines import ENGINES
from rlhf_cli.errors import RlhfError
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
    ModelOpt,
    ModelPricesOpt,
    OutputOpt,
    SeedOpt,
    StreamResumeOpt,
    TrustOpt,
    refuse_extra_args,
)

API = ApiOptions()


@dataclass(frozen=True)
class SampleConfig:
    prompts: str
    model: str = "builtin:tiny"
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    batch_size: int = 8
    format: str = "chat"
    output: str = "-"
    resume: bool = False  # append to `output`, skipping prompts already in it
    device: str = "auto"
    dtype: str = "fp32"
    trust_remote_code: bool = False
    engine: str = "hf"  # local models: hf = generation.generate, vllm = an in-process vLLM engine
    engine_memory: float = 0.3  # vllm: its share of accelerator memory (on CPU: a cap on its KV pool, of RAM)
    api: ApiOptions = API  # --model api:MODEL only; max_retries and timeout from --config

    COMMAND: ClassVar[str] = "sample"
    FLAGS: ClassVar[dict[str, str]] = {"n": "-n"}
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"max_retries", "timeout"})
    LIMITS: ClassVar[dict[str, Any]] = {
        "n": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]", "top_k": ">= 0", "max_new_tokens": ">= 1",
        "batch_size": ">= 1", "format": ("chat", "raw"), "dtype": ("fp32", "bf16", "fp16"),
        "engine": ENGINES, "engine_memory": "(0, 1]",
    }


def command(
    ctx: typer.Context,
    prompts: Annotated[str, typer.Argument(help="Prompt JSONL file, or '-' for stdin.", show_default=False)],
    model: ModelOpt = SampleConfig.model,
    n: Annotated[int, typer.Option("-n", "--n", help="Completions per prompt (K).")] = SampleConfig.n,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = SampleConfig.temperature,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")] = SampleConfig.top_p,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")] = SampleConfig.top_k,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest completion, in tokens.")] = SampleConfig.max_new_tokens,
    seed: SeedOpt = SampleConfig.seed,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable); not included in the text.")] = None,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="Record token ids and per-token log-probs (api: the server's log-probs, no ids).")] = SampleConfig.logprobs,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per generate call.")] = SampleConfig.batch_size,
    format: FormatOpt = SampleConfig.format,
    output: OutputOpt = SampleConfig.output,
    resume: StreamResumeOpt = SampleConfig.resume,
    device: DeviceOpt = SampleConfig.device,
    dtype: DtypeOpt = SampleConfig.dtype,
    trust_remote_code: TrustOpt = SampleConfig.trust_remote_code,
    engine: EngineOpt = SampleConfig.engine,
    engine_memory: EngineMemoryOpt = SampleConfig.engine_memory,
    base_url: ModelBaseUrlOpt = API.base_url,
    api_key_env: ModelApiKeyEnvOpt = API.api_key_env,
    concurrency: ModelConcurrencyOpt = API.concurrency,
    prices: ModelPricesOpt = API.prices,
    max_cost: ModelMaxCostOpt = API.max_cost,
    config: ConfigOpt = None,
) -> None:
    """Sample K completions per prompt; one JSONL row per prompt on stdout (or --output FILE).

    Output row: the input fields + id, completions (K strings), finish_reasons ("stop" | "length"),
    completion_tokens, prompt_tokens, sampling {model, temperature, top_p, top_k, max_new_tokens,
    seed, n, stop}; with --logprobs also completion_token_ids and logprobs.

    --engine vllm samples with in-process vLLM (pip install 'rlhf-cli[vllm]'; not under torchrun):
    the same rows plus sampling.engine.

    --model api:MODEL asks an OpenAI-compatible server (--base-url; the key from $OPENAI_API_KEY or
    --api-key-env): rows as above plus sampling.base_url, no completion_token_ids. Exit codes: 0
    done, 2 bad input, 3 stopped at --max-cost (finished rows kept; --resume continues). --config
    FILE also sets max-retries and timeout (seconds per request).

    Examples:

      rlhf sample prompts.jsonl --model sft/ -n 4 > samples.jsonl

      rlhf sample prompts.jsonl --model sft/ -n 4 -o samples.jsonl --resume   # continue a killed run

      rlhf sample prompts.jsonl --config sample.yaml -t 0.7 > samples.jsonl   # a flag beats the file

      echo '{"prompt": "2+2="}' | rlhf sample - --model sft/ --temperature 0

      rlhf sample prompts.jsonl --model sft/ -n 8 -b 64 --engine vllm > samples.jsonl

      rlhf sample prompts.jsonl --model api:gpt-4o-mini -n 4 --max-cost 1 -o samples.jsonl --resume

      rlhf sample prompts.jsonl --model api:smollm2 --base-url http://127.0.0.1:8080/v1 > samples.jsonl
    """
    refuse_extra_args(ctx)
    run(from_cli(SampleConfig, ctx, {**locals(), "stop": tuple(stop or ())}, config))


def validate(cfg: SampleConfig) -> None:
    from rlhf_cli.config import check

    check(cfg)
    if cfg.temperature == 0 and cfg.n > 1:
        raise RlhfError("-n > 1 with --temperature 0 gives K identical completions", "use a temperature > 0")
    if cfg.resume and cfg.output == "-":
        raise RlhfError("--resume needs the --output FILE to continue", "e.g. -o samples.jsonl --resume")


def done_ids(path: str) -> set[Any]:
    """Ids already written to a resume file (a half-written last row from a kill is cut off)."""
    from rlhf_cli.data.jsonl import iter_jsonl, truncate_partial_last_line

    if not Path(path).exists():
        return set()
    truncate_partial_last_line(path)
    return {line.data.get("id") for line in iter_jsonl(path)}


def run(cfg: SampleConfig) -> int:
    """Sample and write rows; returns the number of rows written."""
    from rlhf_cli.data.jsonl import JsonlSink, read_jsonl
    from rlhf_cli.data.records import assign_ids, parse_prompt_row, render_prompt
    from rlhf_cli.engines import check_engine, local_generator
    from rlhf_cli.models.loading import parse_model_spec

    # 1. validate and tokenize all input before loading the model
    validate(cfg)
    rows = assign_ids([parse_prompt_row(line) for line in read_jsonl(cfg.prompts)])
    spec = parse_model_spec(cfg.model)
    check_engine(cfg.engine, [cfg.model])
    skip = done_ids(cfg.output) if cfg.resume else set()
    todo = [r for r in rows if r.id not in skip]
    if skip:
        info(f"resume: {len(rows) - len(todo)} of {len(rows)} prompts already in {cfg.output}")
    if spec.kind == "api":
        sampler = api_sampler(cfg)  # key, URL and prices checked; nothing sent yet
        try:
            return run_api(cfg, todo, sampler) if todo else 0
        finally:
            sampler.close()
    if not todo:
        return 0

    from rlhf_cli.generation import SamplingParams, batch_seed
    from rlhf_cli.metrics import progress_bar
    from rlhf_cli.models.loading import load_tokenizer

    tok = load_tokenizer(spec, cfg.trust_remote_code)
    prompt_ids = [render_prompt(tok, r.prompt, r.messages, cfg.format) for r in todo]
    for r, ids in zip(todo, prompt_ids, strict=True):
        if not ids:
            raise RlhfError(f"{r.where}: the prompt is empty once tokenized", "give some prompt text or use --format chat")

    # 2. model: our sampler on --device, or an in-process vLLM engine
    params = SamplingParams(cfg.n, cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.seed, cfg.stop)
    sampling = {"model": cfg.model, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "n": cfg.n, "stop": list(cfg.stop)}
    if cfg.engine != "hf":
        sampling["engine"] = cfg.engine
    engine = local_generator(cfg.engine, spec, tok, max_len=max(map(len, prompt_ids)) + cfg.max_new_tokens, dtype=cfg.dtype,
                             device=cfg.device, memory=cfg.engine_memory, seed=cfg.seed, max_seqs=cfg.batch_size * cfg.n,
                             trust_remote_code=cfg.trust_remote_code)

    # 3. generate batch by batch, streaming rows in input order
    written = 0
    new_tokens = 0
    with engine as gen, JsonlSink(cfg.output, append=cfg.resume) as sink, progress_bar(True) as bar:
        task = bar.add_task("sample", total=len(todo), stats="")
        for b in range(0, len(todo), cfg.batch_size):
            batch, batch_ids = todo[b : b + cfg.batch_size], prompt_ids[b : b + cfg.batch_size]
            seed = batch_seed(cfg.seed, [str(r.id) for r in batch])
            results = gen(batch_ids, params, seed, cfg.logprobs)
            for r, p_ids, comps in zip(batch, batch_ids, results, strict=True):
                out = dict(r.extra)
                out["id"] = r.id
                out["completions"] = [c.text for c in comps]
                out["finish_reasons"] = [c.finish_reason for c in comps]
                out["completion_tokens"] = [len(c.token_ids) for c in comps]
                out["prompt_tokens"] = len(p_ids)
                out["sampling"] = sampling
                if cfg.logprobs:
                    out["completion_token_ids"] = [c.token_ids for c in comps]
                    out["logprobs"] = [c.logprobs for c in comps]
                sink.write(out)
                written += 1
                new_tokens += sum(len(c.token_ids) for c in comps)
            sink.sync()
            bar.update(task, advance=len(batch), stats=f"{new_tokens:,} new tokens")
    return written


# ---------------------------------------------------------------------------------- --model api:MODEL


def api_sampler(cfg: SampleConfig) -> Any:
    from rlhf_cli.api_generation import ApiSampler
    from rlhf_cli.console import warn

    if cfg.device != SampleConfig.device or cfg.dtype != SampleConfig.dtype:
        warn("--device and --dtype do nothing for an api: model (the server decides)")
    hint = f"finished rows are in {cfg.output}: rerun with --resume to continue" if cfg.output != "-" else "write to -o FILE to be able to --resume"
    sampler = ApiSampler(cfg.model, cfg.api, cfg.seed, rerun_hint=hint)
    sampler.check(cfg.top_k)
    return sampler


def run_api(cfg: SampleConfig, todo: list[Any], sampler: Any) -> int:
    """The api engine: the same rows, from requests in flight --concurrency at a time; -> rows written."""
    from rlhf_cli.api_client import ApiStopped
    from rlhf_cli.data.jsonl import JsonlSink
    from rlhf_cli.metrics import progress_bar

    # 1. what each request sends: the row's messages, the prompt as one user turn, or (--format raw) the text
    prompts: list[Any] = []
    for r in todo:
        if r.messages is not None or cfg.format == "chat":
            prompts.append([dict(m) for m in r.messages] if r.messages is not None else [{"role": "user", "content": r.prompt}])
        elif not r.prompt:
            raise RlhfError(f"{r.where}: the prompt is empty", "give some prompt text or use --format chat")
        else:
            prompts.append(r.prompt)
    sampling = {"model": cfg.model, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "n": cfg.n, "stop": list(cfg.stop), "base_url": sampler.base_url}

    # 2. rows in input order as answers come in (rows after a gap wait for it)
    written = new_tokens = 0
    with JsonlSink(cfg.output, append=cfg.resume) as sink, progress_bar(True) as bar:
        task = bar.add_task("sample", total=len(todo), stats="")
        answers = sampler.sample(prompts, [str(r.id) for r in todo], n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, max_tokens=cfg.max_new_tokens, stop=cfg.stop, seed=cfg.seed, logprobs=cfg.logprobs)
        for i, got in answers:
            out = dict(todo[i].extra)
            out["id"] = todo[i].id
            out["completions"] = [c.text for c in got.completions]
            out["finish_reasons"] = [c.finish_reason for c in got.completions]
            out["completion_tokens"] = [c.tokens for c in got.completions]
            out["prompt_tokens"] = got.prompt_tokens
            out["sampling"] = sampling
            if cfg.logprobs:
                out["logprobs"] = [c.logprobs for c in got.completions]
            sink.write(out)
            sink.sync()
            written += 1
            new_tokens += sum(c.tokens or 0 for c in got.completions)
            bar.update(task, advance=1, stats=f"{new_tokens:,} new tokens, ${sampler.api.n.spent:.4f}")

    # 3. a budget stop: what is written stays, --resume asks only for the rest
    if sampler.stopped:
        raise ApiStopped(f"{sampler.stopped}: {written} of {len(todo)} prompts written",
                         f"raise --max-cost and rerun with -o {cfg.output} --resume" if cfg.output != "-" else "write to -o FILE to be able to --resume")
    return written
