"""What every `rlhf eval` kind returns, and the shared output: summary, table, per-example log, plot.

    result = EvalResult(kind="exact", model="sft/", metrics={"exact_match": 0.62}, n=200, primary="exact_match",
                        samples=[{"id": 0, "input": ..., "output": ..., "extracted": "18", "target": "18", "score": 1.0}])
    report([result_base, result_sft], log_samples="samples.jsonl", plot="compare.png")

Output contract of every kind:
  * stdout: exactly one line of JSON, the summary:
      {"kind": "exact", "data": "gsm8k.jsonl", "results": [{"model": "sft/", "n": 200, "exact_match": 0.62,
       "exact_match_stderr": 0.034, ...}, ...]}
  * stderr: a rich table, one row per model, one column per metric;
  * `--log-samples FILE`: every example of every model as JSONL ({"model", "id", "input", "output",
    "extracted", "target", "score", ...kind-specific}), written atomically;
  * `--plot FILE.png`: a bar chart of the primary metric per model (with its standard error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer


@dataclass
class EvalResult:
    kind: str  # mc | exact | code | winrate | rm | ppl
    model: str  # the model spec (or a label such as a generator name for winrate from files)
    metrics: dict[str, float]  # e.g. {"acc": 0.61, "acc_stderr": 0.01, "acc_norm": 0.63}
    n: int  # examples scored
    primary: str  # the headline metric, a key of `metrics` (what --plot draws and the table leads with)
    samples: list[dict[str, Any]] = field(default_factory=list)  # per-example rows for --log-samples
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping in the summary


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n), as lm-evaluation-harness reports)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summary(results: list[EvalResult], data: str) -> dict[str, Any]:
    return {"kind": results[0].kind if results else None, "data": data,
            "results": [{"model": r.model, "n": r.n, **r.metrics, **r.extra} for r in results]}


def report(results: list[EvalResult], data: str, log_samples: str | None = None, plot: str | None = None) -> dict[str, Any]:
    """Write the summary line to stdout, the table to stderr, and the optional sample log and plot."""
    import sys

    import orjson
    from rich.table import Table

    from rlhf_cli.console import err, info
    from rlhf_cli.data.jsonl import atomic_file

    out = summary(results, data)
    if log_samples:
        with atomic_file(log_samples) as f:
            for r in results:
                for row in r.samples:
                    f.write(orjson.dumps({"model": r.model, **row}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        info(f"wrote {sum(len(r.samples) for r in results)} sample rows to {log_samples}")
    if plot and results:
        plot_results(results, plot)
        info(f"plot: {plot}")
    keys: list[str] = []
    for r in results:
        for k in [r.primary, *r.metrics]:
            if k not in keys and not k.endswith("_stderr"):
                keys.append(k)
    table = Table(title=f"rlhf eval {results[0].kind if results else ''}: {data}")
    table.add_column("model")
    table.add_column("n", justify="right")
    for k in keys:
        table.add_column(k, justify="right")
    for r in results:
        cells = []
        for k in keys:
            v = r.metrics.get(k)
            se = r.metrics.get(f"{k}_stderr")
            if v is None or isinstance(v, (int, str)) or not isinstance(v, float):  # counts and labels as they are
                cells.append("-" if v is None else str(v))
                continue
            cells.append(f"{v:.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else ""))
        table.add_row(r.model, str(r.n), *cells)
    err.print(table)
    sys.stdout.buffer.write(orjson.dumps(out) + b"\n")
    sys.stdout.flush()
    return out


def plot_results(results: list[EvalResult], path: str) -> None:
    """Bar chart of each model's primary metric with a ±1 standard-error whisker; atomic PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from rlhf_cli.data.jsonl import atomic_file

    primary = results[0].primary
    fig = Figure(figsize=(max(4.0, 1.6 * len(results)), 3.6))
    ax = fig.add_subplot()
    values = [r.metrics.get(primary, math.nan) for r in results]
    errors = [r.metrics.get(f"{primary}_stderr", 0.0) for r in results]
    errors = [e if e is not None and math.isfinite(e) else 0.0 for e in errors]
    ax.bar([Path(r.model).name or r.model for r in results], values, yerr=errors, capsize=4, color="#4C72B0")
    ax.set_ylabel(primary)
    ax.set_title(f"rlhf eval {results[0].kind}")
    for i, v in enumerate(values):
        if math.isfinite(v):
            ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    with atomic_file(path) as f:
        f.write(buf.getvalue())


# --- options every kind shares (declared once, the options.py pattern) -------------------------------

ModelsOpt = Annotated[
    list[str],
    typer.Option("--model", "-m", help="Model to evaluate (repeat for a comparison table: base, SFT, PPO ...)."),
]
LogSamplesOpt = Annotated[str | None, typer.Option("--log-samples", help="Write every example's input, output, extracted answer and score here (JSONL).")]
PlotOpt = Annotated[str | None, typer.Option("--plot", help="Bar chart of the headline metric per model (PNG).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Evaluate only the first N examples.")]
FieldOpt = Annotated[
    list[str] | None,
    typer.Option("--field", help="Map a generic JSONL layout: NAME=COLUMN, e.g. --field question=problem (repeatable)."),
]


def parse_fields(specs: list[str] | None, allowed: tuple[str, ...]) -> dict[str, str]:
    """`--field name=column` pairs -> {name: column}; unknown names are a usage error (exit 2)."""
    from rlhf_cli.errors import RlhfError

    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, column = spec.partition("=")
        if not sep or not name or not column:
            raise RlhfError(f"--field {spec!r}: expected NAME=COLUMN", f"names: {', '.join(allowed)}")
        if name not in allowed:
            raise RlhfError(f"--field {spec!r}: unknown name {name!r}", f"names: {', '.join(allowed)}")
        out[name] = column
    return out
