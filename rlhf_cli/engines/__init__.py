"""Generation engines other than our own KV-cached sampler (`rlhf_cli.generation`).

An engine turns prompt token ids into `generation.Completion`s, exactly the types `generation.generate`
returns, so `sample`, `grpo` and `ppo` can swap one for the other with `--engine`. Each engine's
heavy dependency (vLLM, ...) is an optional extra imported only when that engine is built.

What the generating commands (`sample`, `eval exact|code|winrate -m`) share, in one place:

    check_engine(cfg.engine, cfg.models)                   # before anything loads: api:, torchrun, vLLM importable
    with local_generator(cfg.engine, spec, tok, max_len=longest + new) as gen:
        groups = gen(prompt_ids, params, seed)             # = generation.generate(model, tok, prompt_ids, params, device, seed)
    for i, comps in local_completions("sft/", prompts, keys, params, batch_size=8):   # the evals' batch loop
        ...

This module imports neither torch nor vLLM at the top: `rlhf --help` and the configs' LIMITS read it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rlhf_cli.errors import RlhfError

if TYPE_CHECKING:
    from rlhf_cli.generation import Completion, SamplingParams
    from rlhf_cli.models.loading import ModelSpec

ENGINES = ("hf", "vllm")  # the configs' LIMITS for --engine
MAX_SEQS = 256  # at most vLLM's own max_num_seqs for `LLM` on CPUs and most GPUs, however large -b x -n is


class GenerateFn(Protocol):
    """`generation.generate` without the model, tokenizer and device: what `local_generator` yields."""

    def __call__(self, prompts: list[list[int]], params: SamplingParams, seed: int, logprobs: bool = False) -> list[list[Completion]]: ...


def check_engine(engine: str, models: Iterable[str]) -> None:
    """Refuse what `--engine vllm` cannot do, before any model loads (the choices are the configs' LIMITS):
    an api: model (its server generates), torchrun (vLLM starts its own one-process group), no vLLM."""
    if engine != "vllm":
        return
    api = next((m for m in models if m.startswith("api:")), None)
    if api is not None:
        raise RlhfError(f"--engine vllm with --model {api}: api: models are served already", "drop --engine vllm")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RlhfError("--engine vllm runs in a single process, not under torchrun", "launch without torchrun, or drop --engine vllm")
    from rlhf_cli.engines.vllm import import_vllm

    import_vllm()  # not installed: exit 2 with the install line


@contextmanager
def local_generator(engine: str, spec: ModelSpec, tok: Any, *, max_len: int, dtype: str = "fp32", device: str = "auto",
                    memory: float = 0.3, seed: int = 0, max_seqs: int = 64, trust_remote_code: bool = False) -> Iterator[GenerateFn]:
    """A local model behind `GenerateFn`: loaded onto `device` for our sampler (engine "hf"), or served by an
    in-process `VllmEngine` ("vllm"), shut down when the block ends.

    vllm: a local HF directory is served from where it is; a builtin:, .gguf or hub model is loaded here and
    written to a temporary directory that goes when the block ends. max_len: the longest prompt plus
    max_new_tokens (it sizes vLLM's KV pool), capped at the model's context length: completions that reach
    it end with "length", prompts that fill it are an error. memory: `--engine-memory`. max_seqs: the most
    sequences one call holds (vLLM's `max_num_seqs`). --device does not apply: vLLM places the model itself.
    """
    from rlhf_cli.models.loading import load_model

    if engine == "hf":
        from rlhf_cli import runtime
        from rlhf_cli.generation import generate

        dev = runtime.pick_device(device)
        model = load_model(spec, tok, dtype, trust_remote_code).to(dev).eval()

        def hf(prompts: list[list[int]], params: SamplingParams, seed: int, logprobs: bool = False) -> list[list[Completion]]:
            return generate(model, tok, prompts, params, dev, seed, logprobs=logprobs)

        yield hf
        return

    from rlhf_cli.console import warn
    from rlhf_cli.engines.vllm import VllmEngine
    from rlhf_cli.models.loading import read_json_object

    if device != "auto":
        warn(f"--device {device} does nothing with --engine vllm (vLLM places the model itself)")
    kw: dict[str, Any] = dict(dtype=dtype, memory=memory, seed=seed, max_seqs=min(max_seqs, MAX_SEQS))
    with tempfile.TemporaryDirectory(prefix="rlhf-vllm-") as tmp:
        if spec.kind == "dir":
            limit = min(max_len, _context_len(read_json_object(Path(spec.value) / "config.json")) or max_len)
            eng = VllmEngine(spec.value, max_len=limit, tokenizer=tok, **kw)
        else:
            loaded = load_model(spec, tok, dtype, trust_remote_code)
            limit = min(max_len, _context_len(loaded.config.to_dict()) or max_len)
            eng = VllmEngine.from_model(loaded, tok, tmp, max_len=limit, **kw)
            del loaded  # the engine holds its own copy

        def vllm(prompts: list[list[int]], params: SamplingParams, seed: int, logprobs: bool = False) -> list[list[Completion]]:
            longest = max((len(p) for p in prompts), default=0)
            if longest >= limit:
                raise RlhfError(f"a prompt of {longest} tokens leaves no room in the model's context of {limit}",
                                "shorten the prompts (or their few-shot examples)")
            return eng.generate(prompts, params, seed, logprobs)

        try:
            yield vllm
        finally:
            eng.close()


def local_completions(model: str, prompts: Sequence[str | list[dict[str, Any]]], keys: Sequence[str], params: SamplingParams, *,
                      batch_size: int, engine: str = "hf", memory: float = 0.3, device: str = "auto", dtype: str = "fp32",
                      seed: int = 0, trust_remote_code: bool = False) -> Iterator[tuple[int, list[Completion]]]:
    """(index, `params.n` completions) per prompt from the local `model`, in prompt order: what
    `ApiSampler.sample_all` yields for an api: model, from the same prompts (a string is raw text, a list
    of messages goes through the chat template). Batch by batch, each seeded by its prompts' `keys`
    (`generation.batch_seed`), so a prompt's samples do not depend on the rest of the file's order."""
    for _, i, comps in local_passes(model, prompts, keys, [params], batch_size=batch_size, engine=engine, memory=memory, device=device,
                                    dtype=dtype, seed=seed, trust_remote_code=trust_remote_code):
        yield i, comps


def local_passes(model: str, prompts: Sequence[str | list[dict[str, Any]]], keys: Sequence[str], passes: Sequence[SamplingParams], *,
                 batch_size: int, engine: str = "hf", memory: float = 0.3, device: str = "auto", dtype: str = "fp32",
                 seed: int = 0, trust_remote_code: bool = False) -> Iterator[tuple[int, int, list[Completion]]]:
    """`local_completions` for several sampling passes over the same prompts (`known`: greedy, then
    sampled) with the model loaded once: (pass index, prompt index, completions), pass by pass."""
    from rlhf_cli.data.records import render_prompt
    from rlhf_cli.generation import batch_seed
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    if not prompts or not passes:
        return
    spec = parse_model_spec(model)
    tok = load_tokenizer(spec, trust_remote_code)
    ids = [render_prompt(tok, p, None, "raw") if isinstance(p, str) else render_prompt(tok, None, p, "chat") for p in prompts]
    longest, widest = max(p.max_new_tokens for p in passes), max(p.n for p in passes)
    with local_generator(engine, spec, tok, max_len=max(map(len, ids)) + longest, dtype=dtype, device=device,
                         memory=memory, seed=seed, max_seqs=batch_size * widest, trust_remote_code=trust_remote_code) as gen:
        for k, params in enumerate(passes):
            for b in range(0, len(ids), batch_size):
                groups = gen(ids[b : b + batch_size], params, batch_seed(seed, [str(x) for x in keys[b : b + batch_size]]))
                yield from ((k, i, g) for i, g in enumerate(groups, start=b))


def _context_len(config: dict[str, Any]) -> int | None:
    """The model's context length from its config.json, when it states one."""
    config = config.get("text_config") or config
    n = config.get("max_position_embeddings")
    return n if isinstance(n, int) and n > 0 else None
