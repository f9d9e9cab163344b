"""Reading `rlhf eval winrate`'s inputs: outputs files (an AlpacaEval model_outputs.json array, JSONL,
or `rlhf sample` rows), matched to reference rows by instruction; AlpacaEval annotations.json files;
and AlpacaEval's instruction_difficulty.csv. Every error names file:line and a next step.

    from rlhf_cli.evals.alpaca_data import match, read_outputs
    refs = read_outputs("gpt4_1106_preview/model_outputs.json", {})
    pairs = match(read_outputs("model_outputs.json", {}), refs, "gpt4_1106_preview/model_outputs.json")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from rlhf_cli.console import warn
from rlhf_cli.data.jsonl import Line, load_records
from rlhf_cli.errors import RlhfError


class Output(NamedTuple):
    """One row of an outputs file: what was asked, what was answered, by whom, and where it was read."""

    instruction: str
    output: str
    generator: str | None
    row: dict[str, Any]
    where: str


@dataclass(frozen=True)
class Pair:
    """One judged comparison: reference row `index` (its position in the reference file)."""

    index: int
    instruction: str
    reference: str
    candidate: str
    row: dict[str, Any]  # the reference row (a rule judge reads its answer field)
    where: str  # the candidate's file:line
    preference: float | None = None  # given (annotations), else the judge's


def _text(line: Line, key: str, column: str, hint: str | None = None) -> str:
    v = line.data.get(column)
    if column == "completions" and isinstance(v, list) and v and isinstance(v[0], str):
        return v[0]  # an `rlhf sample` row: its first completion
    if not isinstance(v, str):
        got = "missing" if v is None else type(v).__name__
        raise RlhfError(f"{line.where}: {key} field {column!r} is {got}, expected a string",
                        hint or f"the row has: {', '.join(sorted(line.data))}; name the column with --field {key}=COLUMN")
    return v


def read_outputs(path: str, fields: dict[str, str]) -> list[Output]:
    """An outputs file (AlpacaEval JSON array, or JSONL) as Output rows; errors name file:line.

    Columns: --field NAME=COLUMN, else instruction <- "instruction" | "prompt", output <- "output" |
    "completion" | "completions"[0] (an `rlhf sample` row), generator <- "generator" (optional).
    """
    out = []
    for line in load_records(path):
        d = line.data
        ins = fields.get("instruction") or ("prompt" if "prompt" in d and "instruction" not in d else "instruction")
        col = fields.get("output") or next((c for c in ("output", "completion", "completions") if c in d), "output")
        gen = d.get(fields.get("generator", "generator"))
        out.append(Output(_text(line, "instruction", ins), _text(line, "output", col), gen if isinstance(gen, str) else None, d, line.where))
    return out


def label_of(path: str, rows: list[Output]) -> str:
    """A candidate set's name: its one `generator`, else the file name."""
    gens = {r.generator for r in rows}
    if len(gens) == 1 and None not in gens:
        return str(gens.pop())
    return "<stdin>" if path == "-" else Path(path).name


def match(cands: list[Output], refs: list[Output], ref_path: str, limit: int | None = None) -> list[Pair]:
    """Candidates onto reference rows by instruction, in reference order (the k-th repeat of an
    instruction meets its k-th repeat in the reference). A candidate the reference lacks is an
    error; reference rows (of the first --limit) without a candidate are left out with a warning."""
    slots: dict[str, list[int]] = {}
    for k, r in enumerate(refs):
        slots.setdefault(r.instruction, []).append(k)
    taken: dict[int, Output] = {}
    seen: dict[str, int] = {}
    for c in cands:
        n = seen[c.instruction] = seen.get(c.instruction, -1) + 1
        ks = slots.get(c.instruction, [])
        if n >= len(ks):
            what = "is not in" if not ks else f"appears more often ({n + 1}x) than in"
            raise RlhfError(f"{c.where}: instruction {what} the reference {ref_path}: {c.instruction[:60]!r}",
                            "candidates and reference must share instructions; check --field instruction=COLUMN")
        taken[ks[n]] = c
    want = len(refs) if limit is None else min(limit, len(refs))
    keep = [k for k in sorted(taken) if k < want]
    if not keep:
        raise RlhfError(f"{cands[0].where}: no candidate answers the first {want} reference instructions", "raise --limit")
    if len(keep) < want:
        warn(f"{want - len(keep)} of {want} reference instructions have no candidate output; scoring the {len(keep)} that do")
    return [Pair(k, refs[k].instruction, refs[k].output, taken[k].output, refs[k].row, taken[k].where) for k in keep]


def read_annotations(path: str, limit: int | None = None) -> tuple[str, list[Pair]]:
    """AlpacaEval annotations.json -> (generator_2, pairs). output_1 is the reference, output_2 the
    model; preference in [1, 2], 0 (a legacy tie) becomes 1.5, null / NaN stays None (no answer)."""
    lines = load_records(path)[:limit]
    hint = 'AlpacaEval annotations rows: {"instruction", "output_1", "output_2", "generator_2", "preference"}'
    pairs: list[Pair] = []
    gens: dict[str, str] = {}  # generator_2 -> where first seen
    for k, line in enumerate(lines):
        d = line.data
        p = d.get("preference")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))):
            raise RlhfError(f"{line.where}: preference must be a number in [1, 2] or null, got {p!r}", hint)
        if p is not None and math.isnan(p):
            p = None
        if p == 0:
            p = 1.5
        if p is not None and not 1 <= p <= 2:
            raise RlhfError(f"{line.where}: preference {p} is outside [1, 2]", "1 = output_1 (the reference) better, 2 = output_2 better, 1.5 = tie")
        gen = d.get("generator_2")
        if isinstance(gen, str):
            gens.setdefault(gen, line.where)
            if len(gens) > 1:
                first, where = next(iter(gens.items()))
                raise RlhfError(f"{line.where}: generator_2 {gen!r} differs from {first!r} ({where})", "one model per annotations file")
        pairs.append(Pair(k, _text(line, "instruction", "instruction", hint), _text(line, "output_1", "output_1", hint),
                          _text(line, "output_2", "output_2", hint), d, line.where, None if p is None else float(p)))
    label = next(iter(gens)) if gens else ("<stdin>" if path == "-" else Path(path).name)
    return label, pairs


def read_difficulty(path: str) -> dict[int, float]:
    """AlpacaEval's instruction_difficulty.csv (header `index,instruction_difficulty`): row index -> difficulty."""
    import csv

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RlhfError(f"{path}: cannot read ({e.strerror})", "give AlpacaEval's instruction_difficulty.csv") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or "instruction_difficulty" not in rows[0]:
        raise RlhfError(f"{path}:1: expected a header with an 'instruction_difficulty' column", "AlpacaEval's file: index,instruction_difficulty")
    col = rows[0].index("instruction_difficulty")
    out = {}
    for n, r in enumerate(rows[1:], start=2):
        try:
            out[int(r[0])] = float(r[col])
        except (ValueError, IndexError):
            raise RlhfError(f"{path}:{n}: expected INDEX,DIFFICULTY numbers, got {','.join(r)!r}") from None
    return out


def lookup_difficulty(table: dict[int, float], pairs: list[Pair], path: str | None) -> list[float]:
    missing = [p for p in pairs if p.index not in table]
    if missing:
        raise RlhfError(f"{path}: no difficulty for index {missing[0].index} ({missing[0].where})",
                        "the index is the row's position in the reference (or annotations) file, from 0")
    return [table[p.index] for p in pairs]
