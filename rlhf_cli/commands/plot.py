"""`rlhf plot`: training curves from metrics.jsonl as a PNG (people read training by looking).

Reads one or more metrics.jsonl files (as written by `rlhf sft`, `rlhf train-rm` and `rlhf ppo`:
one JSON object per step with "step" and numeric metrics) and draws one panel per quantity. The
panels follow what the file holds: reward / KL / losses / clipping / response length for PPO,
loss and learning rate for SFT, loss / accuracy / margin for a reward model, every numeric key
otherwise. Several files are overlaid so two runs compare; NaN, inf and missing values are skipped.

    rlhf plot ppo/metrics.jsonl -o curves.png
    rlhf plot run-a/metrics.jsonl run-b/metrics.jsonl --smooth 10 -o compare.png
    rlhf plot sft/metrics.jsonl -k loss -k eval_loss --x epoch -o sft.png
    cat ppo-state/metrics.jsonl | rlhf plot - -o live.png        # a run still in progress
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeGuard

import typer

from rlhf_cli.config import from_cli
from rlhf_cli.console import info, warn
from rlhf_cli.errors import RlhfError
from rlhf_cli.options import ConfigOpt

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class PlotConfig:
    files: tuple[str, ...]  # metrics.jsonl paths; '-' = stdin (once)
    output: str = "curves.png"
    metrics: tuple[str, ...] = ()  # empty: panels chosen from what the files hold; "a,b" entries are split
    smooth: int = 1  # trailing moving-average window; 1 = off
    x: str = "step"

    COMMAND: ClassVar[str] = "plot"
    LIMITS: ClassVar[dict[str, Any]] = {"smooth": ">= 1"}


@dataclass(frozen=True)
class Panel:
    """One subplot: `metrics` on the left axis, `twin` on a right axis (a different scale)."""

    title: str
    metrics: tuple[str, ...]
    twin: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run:
    """One input file: its legend label and its rows (each with a finite numeric x)."""

    label: str
    rows: list[dict[str, Any]]


# Default layouts, by the kind of run. A panel keeps only the metrics the files hold.
PPO_PANELS = (
    Panel("reward", ("reward",), ("reward_norm",)),
    Panel("KL", ("kl", "kl_k3"), ("kl_coef",)),
    Panel("loss", ("policy_loss",), ("value_loss",)),
    Panel("entropy", ("entropy",)),
    Panel("clipping", ("clipfrac", "vf_clipfrac"), ("approx_kl",)),
    Panel("response", ("response_length",), ("eos_share",)),
)
RM_PANELS = (
    Panel("loss", ("loss", "eval_loss")),
    Panel("accuracy", ("accuracy", "eval_accuracy")),
    Panel("margin", ("margin", "eval_margin")),
)
SFT_PANELS = (
    Panel("loss", ("loss", "eval_loss")),
    Panel("learning rate", ("lr",)),
)
_PPO_KEYS = {"policy_loss", "value_loss", "kl", "kl_coef", "reward_norm", "clipfrac", "approx_kl"}


def command(
    ctx: typer.Context,
    files: Annotated[list[str], typer.Argument(help="metrics.jsonl files, or '-' for stdin; several are overlaid.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="PNG to write (atomically).")] = PlotConfig.output,
    metrics: Annotated[
        list[str] | None,
        typer.Option("--metric", "-k", help="Plot this metric, one panel each (repeatable, or comma-separated)."),
    ] = None,
    smooth: Annotated[int, typer.Option("--smooth", help="Moving-average window in rows for per-step metrics; the raw curve stays faint behind.")] = PlotConfig.smooth,
    x: Annotated[str, typer.Option("--x", help="Numeric key for the x axis, e.g. step, epoch.")] = PlotConfig.x,
    config: ConfigOpt = None,
) -> None:
    """Draw reward, KL and loss curves from metrics.jsonl files into one PNG.

    Input: metrics.jsonl rows from `rlhf sft`, `train-rm` or `ppo` (any JSONL of {"step", numeric
    metrics...} works). Panels follow the kind of run unless --metric picks them. Non-finite and
    missing values are skipped; --smooth leaves sparse eval series (every N steps) as they are.
    Several files are overlaid, labelled by file name. A one-line summary goes to stderr.

    Examples:

      rlhf plot ppo/metrics.jsonl -o curves.png

      rlhf plot run-a/metrics.jsonl run-b/metrics.jsonl --smooth 10 -o compare.png

      rlhf plot sft/metrics.jsonl -k loss -k eval_loss --x epoch -o sft.png

      cat ppo-state/metrics.jsonl | rlhf plot - -o live.png
    """
    run(from_cli(PlotConfig, ctx, {**locals(), "files": tuple(files), "metrics": tuple(metrics or ())}, config))


# ---------------------------------------------------------------- pure helpers (tested directly)


def is_number(v: Any) -> TypeGuard[int | float]:
    """A finite int or float (JSON booleans are not numbers here)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def pick_panels(rows: Iterable[Mapping[str, Any]], metrics: Sequence[str] = (), x: str = "step") -> list[Panel]:
    """The panels to draw for these rows (all files together).

    Explicit `metrics`: one panel each, in order. Otherwise the layout of the run's kind (ppo if a
    PPO-only key is present, train-rm if "accuracy" is, sft if "loss" is), keeping only metrics with
    at least one finite value; an unknown file gets one panel per numeric key except x and "step".
    """
    keys: dict[str, None] = {}  # insertion-ordered set: unknown files keep their column order
    for row in rows:
        keys.update((k, None) for k, v in row.items() if is_number(v))
    if metrics:
        return [Panel(m, (m,)) for m in metrics]
    layout = (
        PPO_PANELS if keys.keys() & _PPO_KEYS
        else RM_PANELS if "accuracy" in keys
        else SFT_PANELS if "loss" in keys
        else tuple(Panel(k, (k,)) for k in keys if k not in (x, "step"))
    )
    panels = []
    for p in layout:
        left = tuple(m for m in p.metrics if m in keys and m != x)
        twin = tuple(m for m in p.twin if m in keys and m != x)
        if left or twin:
            panels.append(Panel(p.title, left or twin, twin if left else ()))
    return panels


def series(rows: Iterable[Mapping[str, Any]], metric: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of `metric` against `x`, in file order; rows without a finite value are skipped."""
    xs, ys = [], []
    for row in rows:
        v = row.get(metric)
        if is_number(v):
            xs.append(float(row[x]))
            ys.append(float(v))
    return xs, ys


def moving_average(values: Sequence[float], n: int) -> list[float]:
    """Trailing mean over the last n values (fewer at the start), same length as `values`.

    moving_average([1, 2, 3, 4, 5], 3) == [1, 1.5, 2, 3, 4]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def legend_labels(paths: Sequence[str]) -> list[str]:
    """Shortest distinct path tails: a/metrics.jsonl and b/metrics.jsonl, not metrics.jsonl twice."""
    parts = [("<stdin>",) if p == "-" else Path(p).parts for p in paths]
    for k in range(1, max(len(ps) for ps in parts) + 1):
        labels = ["/".join(ps[-k:]) for ps in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


# ---------------------------------------------------------------- input


def load_runs(cfg: PlotConfig) -> list[Run]:
    """Read and check every file before anything is drawn or written.

    Rows written by Python's json module, with NaN / Infinity tokens, are read too (orjson rejects
    them; our own writers emit null)."""
    from rlhf_cli.data.jsonl import iter_jsonl

    labels = legend_labels(cfg.files)
    runs = []
    for path, label in zip(cfg.files, labels, strict=True):
        lines = list(iter_jsonl(path, nan_ok=True, example='{"step": 1, "loss": 2.3}'))
        if not lines:
            name = "<stdin>" if path == "-" else path
            raise RlhfError(f"{name}:1: file is empty, expected metrics rows", "point at the metrics.jsonl a training run wrote")
        rows = []
        for line in lines:
            row = line.data
            if cfg.x not in row:
                raise RlhfError(
                    f"{line.where}: no {cfg.x!r} field in this row",
                    "metrics rows need the x-axis key; choose another with --x KEY",
                )
            if not is_number(row[cfg.x]):
                raise RlhfError(
                    f"{line.where}: {cfg.x!r} must be a finite number, got {row[cfg.x]!r}",
                    "choose a numeric x axis with --x KEY",
                )
            rows.append(row)
        runs.append(Run(label, rows))
    return runs


def validate(cfg: PlotConfig) -> PlotConfig:
    """Range checks and the input/output paths; returns `cfg` with --metric "a,b" entries split."""
    from rlhf_cli.config import check

    check(cfg)
    if not cfg.files:
        raise RlhfError("no metrics file given", "pass a metrics.jsonl path, or '-' for stdin")
    if cfg.files.count("-") > 1:
        raise RlhfError("stdin ('-') given more than once", "pass '-' at most once")
    out = Path(cfg.output)
    if out.is_dir():
        raise RlhfError(f"{cfg.output}: is a directory, expected a PNG path", "pass -o curves.png")
    if any(f != "-" and Path(f).resolve() == out.resolve() for f in cfg.files):
        raise RlhfError(f"{cfg.output}: is also an input; it would be overwritten", "pass another -o path")
    names = [m.strip() for item in cfg.metrics for m in item.split(",") if m.strip()]
    return replace(cfg, metrics=tuple(dict.fromkeys(names)))


# ---------------------------------------------------------------- drawing


def draw(runs: Sequence[Run], panels: Sequence[Panel], x: str = "step", smooth: int = 1) -> Figure:
    """A matplotlib Figure (Agg canvas, no pyplot global state) with one subplot per panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6 * ncols, 3.5 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    styles = ("-", "--", ":", "-.")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        axes = [(ax, panel.metrics)]
        if panel.twin:
            axes.append((ax.twinx(), panel.twin))
        handles = []
        for j, (a, metric) in enumerate((a, m) for a, ms in axes for m in ms):
            for r, run in enumerate(runs):
                xs, ys = series(run.rows, metric, x)
                if not xs:
                    continue
                # one file: a colour per metric; several: a colour per file, a line style per metric
                color, style = (f"C{j}", "-") if len(runs) == 1 else (f"C{r}", styles[j % len(styles)])
                label = metric if len(runs) == 1 else run.label if len(panel.metrics + panel.twin) == 1 else f"{run.label}: {metric}"
                marker = "o" if len(xs) < 30 else None  # sparse series (eval every N steps) stay visible
                # smooth per-step series only: a held-out metric logged every N steps is already an
                # average over the eval set, and a window of `smooth` evals would blur the whole run
                if smooth > 1 and 2 * len(xs) >= len(run.rows):
                    a.plot(xs, ys, color=color, linestyle=style, alpha=0.25, linewidth=0.8, label=f"_raw {label}")
                    # x is averaged over the same window, so each point sits at its window's centre
                    # and the smoothed curve does not lag the raw one by (smooth - 1) / 2 steps
                    xs, ys = moving_average(xs, smooth), moving_average(ys, smooth)
                (line,) = a.plot(xs, ys, color=color, linestyle=style, marker=marker, markersize=3, label=label)
                handles.append(line)
        ax.set_title(panel.title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        for a, ms in axes:
            a.set_ylabel(", ".join(ms))
        if handles:
            axes[-1][0].legend(handles=handles, fontsize="small", loc="best")
    if len(runs) > 1:
        fig.suptitle(" vs ".join(r.label for r in runs))
    return fig


def run(cfg: PlotConfig) -> Path:
    """Check the input, draw the panels and write the PNG atomically; returns its path."""
    from rlhf_cli.data.jsonl import atomic_file

    # 1. read and check everything before touching the output
    cfg = validate(cfg)
    runs = load_runs(cfg)
    all_rows = [row for r in runs for row in r.rows]
    panels = pick_panels(all_rows, cfg.metrics, cfg.x)
    missing = [m for m in cfg.metrics if not any(is_number(row.get(m)) for row in all_rows)]
    if missing:
        have = sorted({k for row in all_rows for k, v in row.items() if is_number(v)})
        raise RlhfError(
            f"metric {missing[0]!r} has no numeric value in {', '.join(r.label for r in runs)}",
            f"available: {', '.join(have) or 'none'}",
        )
    if not panels:
        raise RlhfError(
            f"no numeric metrics besides {cfg.x!r} in {', '.join(r.label for r in runs)}",
            "metrics rows look like {\"step\": 1, \"loss\": 2.3}",
        )
    for r in runs:
        if not any(is_number(row.get(m)) for row in r.rows for p in panels for m in p.metrics + p.twin):
            warn(f"{r.label}: none of the plotted metrics has a finite value")

    # 2. draw and write (temp file + rename: a half-written PNG never appears)
    fig = draw(runs, panels, cfg.x, cfg.smooth)
    out = Path(cfg.output)
    with atomic_file(out) as f:
        fig.savefig(f, format="png")
    info(
        f"plot: {len(panels)} panels ({', '.join(p.title for p in panels)}) from {len(all_rows)} rows "
        f"in {len(runs)} file{'s' if len(runs) > 1 else ''} -> {out}"
    )
    return out
