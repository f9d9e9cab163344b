"""`rlhf eval ppl`: perplexity of text rows.

    rlhf eval ppl texts.jsonl -m base/ -m sft/
    rlhf eval ppl notes.jsonl -m sft/ --field text=body --max-len 1024

Each row's text (`{"text"}`, or `--field text=COL`) is tokenized as the model would see it (with BOS
where the tokenizer adds one) and split into disjoint windows of at most `--max-len` tokens; every
token after the first of a window is predicted from its window. Reported:
  * token_perplexity = exp(total NLL / predicted tokens)  (depends on the tokenizer)
  * bits_per_byte    = total NLL / (ln 2 * UTF-8 bytes of the texts)  (comparable across tokenizers,
    as lm-evaluation-harness reports for wikitext)
  * byte_perplexity  = 2 ** bits_per_byte
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.config import check, from_cli
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals.base import EvalResult, FieldOpt, LimitOpt, LogSamplesOpt, ModelsOpt, PlotOpt, parse_fields
from rlhf_cli.options import ConfigOpt, DeviceOpt, DtypeOpt, TrustOpt


@dataclass(frozen=True)
class PplConfig:
    data: str
    models: tuple[str, ...] = ()
    max_len: int = 1024
    batch_size: int = 8
    limit: int | None = None
    fields: tuple[str, ...] = ()  # text=COLUMN, as --field (default column: text)
    log_samples: str | None = None
    plot: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    trust_remote_code: bool = False

    COMMAND: ClassVar[str] = "eval ppl"
    FLAGS: ClassVar[dict[str, str]] = {"models": "--model", "fields": "--field"}
    LIMITS: ClassVar[dict[str, Any]] = {"max_len": ">= 2", "batch_size": ">= 1", "limit": ">= 1", "dtype": ("fp32", "bf16")}


def command(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="JSONL with a text per row, or '-'.", show_default=False)],
    models: ModelsOpt = None,  # type: ignore[assignment]
    max_len: Annotated[int, typer.Option("--max-len", help="Tokens per window; longer texts are split.")] = PplConfig.max_len,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward.")] = PplConfig.batch_size,
    limit: LimitOpt = PplConfig.limit,
    fields: FieldOpt = None,
    log_samples: LogSamplesOpt = PplConfig.log_samples,
    plot: PlotOpt = PplConfig.plot,
    device: DeviceOpt = PplConfig.device,
    dtype: DtypeOpt = PplConfig.dtype,
    trust_remote_code: TrustOpt = PplConfig.trust_remote_code,
    config: ConfigOpt = None,
) -> None:
    """Perplexity (per token and per byte) of text rows under each model.

    Prints one JSON line {"kind": "ppl", "results": [{"model", "n", "token_perplexity", "bits_per_byte",
    "byte_perplexity", "tokens"}]} and a table on stderr.

    Examples:

      rlhf eval ppl texts.jsonl -m base/ -m sft/

      rlhf eval ppl notes.jsonl -m sft/ --field text=body --max-len 1024
    """
    run(from_cli(PplConfig, ctx, {**locals(), "models": tuple(models or ()), "fields": tuple(fields or ())}, config))


def load_texts(path: str, key: str, limit: int | None) -> list[tuple[str, str]]:
    from rlhf_cli.data.jsonl import read_jsonl

    out: list[tuple[str, str]] = []
    for line in read_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        text = line.data.get(key)
        if not isinstance(text, str) or not text:
            raise RlhfError(f"{line.where}: no text in field '{key}'", "map it with --field text=COLUMN")
        out.append((line.where, text))
    return out


def windows(ids: list[int], max_len: int) -> list[list[int]]:
    """Disjoint windows of at most max_len tokens; a lone trailing token (nothing to predict) is dropped."""
    return [ids[i : i + max_len] for i in range(0, len(ids), max_len) if len(ids[i : i + max_len]) > 1]


def run(cfg: PplConfig) -> list[EvalResult]:
    from rlhf_cli.evals.base import report

    # 1. options and every text before any model loads
    check(cfg)
    if not cfg.models:
        raise RlhfError("give at least one --model")
    texts = load_texts(cfg.data, parse_fields(list(cfg.fields), ("text",)).get("text", "text"), cfg.limit)
    results = [evaluate(cfg, m, texts) for m in cfg.models]
    report(results, cfg.data, cfg.log_samples, cfg.plot)
    return results


def evaluate(cfg: PplConfig, model_spec: str, texts: list[tuple[str, str]]) -> EvalResult:
    import torch

    from rlhf_cli import runtime
    from rlhf_cli.generation import response_logprobs
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec(model_spec)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    device = runtime.pick_device(cfg.device)
    model = load_model(spec, tok, cfg.dtype, cfg.trust_remote_code).to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    work = [(t, w) for t, (_, text) in enumerate(texts) for w in windows(tok(text)["input_ids"], cfg.max_len)]
    work.sort(key=lambda x: len(x[1]))  # similar lengths per batch: little padding
    nll, count = [0.0] * len(texts), [0] * len(texts)
    with torch.no_grad():
        for b in range(0, len(work), cfg.batch_size):
            batch = work[b : b + cfg.batch_size]
            width = max(len(w) for _, w in batch)
            ids = torch.tensor([w + [pad] * (width - len(w)) for _, w in batch], device=device)  # (B, T) right-padded
            mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for _, w in batch], device=device)
            # token 0 is the "prompt", tokens 1.. are scored: the fused head + log-softmax, no (B, T, V) logits
            lp = response_logprobs(model, ids, mask, 1, ids[:, 1:], mask[:, 1:].bool())  # (B, T-1), 0 on padding
            for (t, w), row in zip(batch, lp.sum(1).tolist(), strict=True):
                nll[t] -= row
                count[t] += len(w) - 1
    per_text = list(zip(nll, count, strict=True))
    total_nll, total_tokens = sum(nll), sum(count)
    total_bytes = sum(len(text.encode()) for _, text in texts)
    if total_tokens == 0:
        raise RlhfError(f"{cfg.data}: every text is a single token; nothing to predict")
    bpb = total_nll / (math.log(2) * total_bytes)
    metrics = {"token_perplexity": math.exp(total_nll / total_tokens), "bits_per_byte": bpb, "byte_perplexity": 2**bpb}
    samples = [{"id": where, "input": text[:200], "output": None, "extracted": {"nll": s, "tokens": c},
                "target": None, "score": math.exp(s / c) if c else None}
               for (where, text), (s, c) in zip(texts, per_text, strict=True)]
    return EvalResult("ppl", model_spec, metrics, len(texts), "token_perplexity", samples, {"tokens": total_tokens})
