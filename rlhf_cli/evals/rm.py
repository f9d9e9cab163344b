"""`rlhf eval rm`: reward-model accuracy on held-out preference pairs, and its taste for length.

Reads every layout `rlhf train-rm` reads (pair rows, ranking rows -> all their ordered pairs, HH-RLHF
transcripts, chosen/rejected message lists; tie rows are skipped) and scores each completion with
each reward model exactly as in training (models/reward.py `score`).

    rlhf eval rm prefs-test.jsonl -m rm/
    rlhf eval rm hh_rlhf/helpful-base/test.jsonl.gz -m rm-a/ -m rm-b/ --log-samples rm.jsonl
    rlhf eval rm judged.jsonl -m rm/ --field prompt=question --field chosen=good --field rejected=bad

Metrics: accuracy = share of pairs with r(chosen) > r(rejected) (an exact tie counts 1/2), mean
margin, and two length diagnostics: the Pearson correlation of reward with answer length (characters)
over all scored completions, and how often the reward model prefers the longer answer of a pair next
to how often the labels do. A reward model that mostly likes long answers shows up as a high
correlation and a `prefers_longer` far above `labels_prefer_longer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.config import check, from_cli
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals.base import EvalResult, FieldOpt, LimitOpt, LogSamplesOpt, PlotOpt, mean_stderr, parse_fields
from rlhf_cli.options import ConfigOpt, DeviceOpt, DtypeOpt, TrustOpt


@dataclass(frozen=True)
class RmEvalConfig:
    data: str
    models: tuple[str, ...] = ()  # reward checkpoints from `rlhf train-rm`
    batch_size: int = 16
    limit: int | None = None
    fields: tuple[str, ...] = ()  # NAME=COLUMN, as --field
    log_samples: str | None = None
    plot: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    trust_remote_code: bool = False

    COMMAND: ClassVar[str] = "eval rm"
    FLAGS: ClassVar[dict[str, str]] = {"models": "--model", "fields": "--field"}
    LIMITS: ClassVar[dict[str, Any]] = {"batch_size": ">= 1", "limit": ">= 1", "dtype": ("fp32", "bf16")}


FIELDS = ("prompt", "messages", "chosen", "rejected", "ranking")
# -m/--model as in every other kind; here the models are reward models (`ppo` takes one as --reward)
RewardModelsOpt = Annotated[
    list[str],
    typer.Option("--model", "-m", help="Reward-model directory from `rlhf train-rm` (repeat to compare)."),
]


@dataclass(frozen=True)
class Pair:
    prompt: Any  # str or a message list
    chosen: str
    rejected: str
    raw: bool  # transcript layouts: the prompt is plain text, not a chat turn
    where: str


def command(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="Preference JSONL (any `train-rm` layout), or '-'.", show_default=False)],
    models: RewardModelsOpt = None,  # type: ignore[assignment]
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward.")] = RmEvalConfig.batch_size,
    limit: LimitOpt = RmEvalConfig.limit,
    fields: FieldOpt = None,
    log_samples: LogSamplesOpt = RmEvalConfig.log_samples,
    plot: PlotOpt = RmEvalConfig.plot,
    device: DeviceOpt = RmEvalConfig.device,
    dtype: DtypeOpt = RmEvalConfig.dtype,
    trust_remote_code: TrustOpt = RmEvalConfig.trust_remote_code,
    config: ConfigOpt = None,
) -> None:
    """Reward-model accuracy on held-out preferences, with reward-vs-length diagnostics.

    -m/--model takes reward checkpoints from `rlhf train-rm` (repeat to compare). Prints one JSON line
    {"kind": "rm", "results": [{"model", "n", "accuracy", "accuracy_stderr", "margin",
    "length_corr", "prefers_longer", "labels_prefer_longer"}]} and a table on stderr.

    Examples:

      rlhf eval rm prefs-test.jsonl -m rm/

      rlhf eval rm hh_rlhf/helpful-base/test.jsonl.gz -m rm-a/ -m rm-b/ --limit 500 --log-samples rm.jsonl
    """
    run(from_cli(RmEvalConfig, ctx, {**locals(), "models": tuple(models or ()), "fields": tuple(fields or ())}, config))


def load_pairs(path: str, limit: int | None, fields: dict[str, str] | None = None) -> list[Pair]:
    """Every ordered (better, worse) pair of every row; tie rows are skipped. `fields` maps the
    train-rm names (prompt, messages, chosen, rejected, ranking) to this file's columns."""
    from rlhf_cli.data.jsonl import Line, read_jsonl
    from rlhf_cli.data.pref_data import parse_pref_row

    fields = fields or {}
    rename = {col: name for name, col in fields.items()}
    pairs: list[Pair] = []
    for line in read_jsonl(path):
        if rename:
            line = Line({rename.get(k, k): v for k, v in line.data.items() if k not in fields or k in rename}, line.path, line.lineno)
        row = parse_pref_row(line)
        prompt = list(row.messages) if row.messages is not None else row.prompt
        for gi, better in enumerate(row.groups):
            for worse in row.groups[gi + 1 :]:
                pairs.extend(Pair(prompt, c, r, row.raw, row.where) for c in better for r in worse)
        if limit is not None and len(pairs) >= limit:
            return pairs[:limit]
    if not pairs:
        raise RlhfError(f"{path}: no preference pairs (only ties?)", "give rows with a chosen and a rejected answer")
    return pairs


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def pair_metrics(r_chosen: list[float], r_rejected: list[float], pairs: list[Pair]) -> dict[str, float]:
    """Accuracy (ties 1/2), margin, and the length diagnostics, from the rewards of each pair."""
    hits = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(r_chosen, r_rejected, strict=True)]
    acc, se = mean_stderr(hits)
    margin = sum(c - r for c, r in zip(r_chosen, r_rejected, strict=True)) / len(pairs)
    unequal = [(i, len(p.chosen) > len(p.rejected)) for i, p in enumerate(pairs) if len(p.chosen) != len(p.rejected)]
    prefers_longer = [float((r_chosen[i] > r_rejected[i]) == chosen_longer) for i, chosen_longer in unequal
                      if r_chosen[i] != r_rejected[i]]
    lengths = [float(len(p.chosen)) for p in pairs] + [float(len(p.rejected)) for p in pairs]
    return {"accuracy": acc, "accuracy_stderr": se, "margin": margin,
            "length_corr": pearson(lengths, list(r_chosen) + list(r_rejected)),
            "prefers_longer": sum(prefers_longer) / len(prefers_longer) if prefers_longer else math.nan,
            "labels_prefer_longer": sum(float(c) for _, c in unequal) / len(unequal) if unequal else math.nan}


def run(cfg: RmEvalConfig) -> list[EvalResult]:
    from rlhf_cli.evals.base import report

    # 1. options and every pair before any model loads
    check(cfg)
    if not cfg.models:
        raise RlhfError("give at least one reward model with -m RM_DIR")
    pairs = load_pairs(cfg.data, cfg.limit, parse_fields(list(cfg.fields), FIELDS))
    results = [evaluate(cfg, m, pairs) for m in cfg.models]
    report(results, cfg.data, cfg.log_samples, cfg.plot)
    return results


def evaluate(cfg: RmEvalConfig, model_dir: str, pairs: list[Pair]) -> EvalResult:
    from rlhf_cli import runtime
    from rlhf_cli.models.reward import load_for_scoring, score

    device = runtime.pick_device(cfg.device)
    model, tok, manifest = load_for_scoring(model_dir, device, cfg.dtype, cfg.trust_remote_code)
    trained = manifest.get("config", {})
    fmt, max_len = trained.get("format", "chat"), trained.get("max_len")
    rewards: dict[bool, list[float]] = {}
    for raw in (False, True):  # transcripts are plain text whatever the RM was trained with
        idx = [i for i, p in enumerate(pairs) if p.raw == raw]
        if idx:
            prompts = [pairs[i].prompt for i in idx] * 2
            comps = [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx]
            rewards[raw] = score(model, tok, prompts, comps, cfg.batch_size, device, "raw" if raw else fmt, max_len)
    r_c, r_r = [0.0] * len(pairs), [0.0] * len(pairs)
    for raw, flat in rewards.items():
        idx = [i for i, p in enumerate(pairs) if p.raw == raw]
        for k, i in enumerate(idx):
            r_c[i], r_r[i] = flat[k], flat[len(idx) + k]
    samples = [{"id": p.where, "input": p.prompt, "output": {"chosen": p.chosen, "rejected": p.rejected},
                "extracted": {"chosen": c, "rejected": r}, "target": "chosen", "score": 1.0 if c > r else 0.5 if c == r else 0.0}
               for p, c, r in zip(pairs, r_c, r_r, strict=True)]
    return EvalResult("rm", model_dir, pair_metrics(r_c, r_r, pairs), len(pairs), "accuracy", samples)
