"""Agreement of a judge with human labels, and adapters for human-labelled pairwise sets.

Label files, detected from their fields (or named: `--against pandalm:PATH`):

| format   | file                                                        | fields                                                   |
|----------|-------------------------------------------------------------|----------------------------------------------------------|
| `pandalm`| PandaLM `testset-v1.json` (JSON array)                      | `idx`, `instruction`, `input`, `response1`, `response2`, `annotator1..3` (1, 2, 0 = tie; majority) |
| `llmbar` | LLMBar, and its Processed MT-Bench / FairEval / LLMEval2 `dataset.json` | `input`, `output_1`, `output_2`, `label` (1 or 2) |
| `jsonl`  | ours, JSONL or a JSON array                                 | `{"id"?, "prompt" (or "messages"), "completions": [a, b], "label": 0 \\| 1 \\| "tie"}` |

Every format becomes our own form (label 0 = the first completion is better, 1 = the second,
"tie"), so a label file is also valid `rlhf pairwise` input:

    rlhf pairwise ../shared/data/pandalm/testset-v1.json --judge lm:M --against ../shared/data/pandalm/testset-v1.json

Verdicts meet labels by prompt id (with the same two texts) or else by (prompt, a, b) content.
Statistics: accuracy and Cohen's kappa, each with a seeded percentile-bootstrap 95% interval.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.data.jsonl import Line, read_jsonl
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import Item

FORMATS = ("pandalm", "llmbar", "jsonl")
TIE = 2  # class codes, relative to a pair (x, y): 0 = x better, 1 = y better, 2 = tie


# ---------------------------------------------------------------------------------- reading


def load_records(path: str) -> list[Line]:
    """JSONL, or one JSON array whose elements are reported at the line where they start."""
    name = "<stdin>" if path == "-" else path
    if path == "-":
        buf = sys.stdin.buffer
        head = buf.peek(256) if hasattr(buf, "peek") else b""
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(256)
        except OSError:
            head = b""  # let read_jsonl word the error
    if head.lstrip()[:1] != b"[":
        return read_jsonl(path)
    text = (sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()).decode("utf-8", errors="replace")
    dec, pos, out = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        lineno = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise RlhfError(f"{name}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise RlhfError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        out.append(Line(obj, name, lineno))
    if not out:
        raise RlhfError(f"{name}:1: the JSON array is empty")
    return out


def detect_format(d: dict[str, Any]) -> str | None:
    """'pandalm' / 'llmbar' / 'jsonl' (labelled) / 'samples' (unlabelled sample rows) / None."""
    if "response1" in d and "annotator1" in d:
        return "pandalm"
    if "output_1" in d and "output_2" in d:
        return "llmbar"
    if "completions" in d:
        return "jsonl" if "label" in d else "samples"
    return None


def read_items(path: str, fmt: str | None = None) -> tuple[str, list[Item]]:
    """Sample rows or a labelled set (any format above) as judge Items with ids assigned."""
    from rlhf_cli.data.records import assign_item_ids, parse_sample_row

    lines = load_records(path)
    fmt = fmt or detect_format(lines[0].data) or "samples"
    if fmt == "pandalm":
        items = [_pandalm(line) for line in lines]
    elif fmt == "llmbar":
        items = [_llmbar(line) for line in lines]
    else:
        items = [parse_sample_row(line) for line in lines]
    return fmt, assign_item_ids(items)


def _text(line: Line, key: str) -> str:
    """A text field; PandaLM has a few answers stored as JSON `true` (the text "True" mangled by a
    round-trip through a parser), so bare scalars are read back as Python writes them."""
    v = line.data.get(key)
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int, float)):
        return str(v)
    raise RlhfError(f"{line.where}: field {key!r} must be a string, got {type(v).__name__}")


def _as_ours(line: Line, prompt: str, a: str, b: str, label: int | str, drop: tuple[str, ...], rid: Any = None) -> Item:
    row: dict[str, Any] = {} if rid is None else {"id": rid}
    row.update(prompt=prompt, completions=[a, b], label=label)
    row.update({k: v for k, v in line.data.items() if k not in drop and k not in row})
    return Item(row.get("id", ""), prompt, (a, b), row, None, line.where)


def _pandalm(line: Line) -> Item:
    d = line.data
    votes = [d.get(f"annotator{k}") for k in (1, 2, 3)]
    if not all(v in (0, 1, 2) and not isinstance(v, bool) for v in votes):
        raise RlhfError(f"{line.where}: annotator1..3 must each be 0 (tie), 1 or 2, got {votes}")
    top, n = Counter(votes).most_common(1)[0]
    label: int | str = {1: 0, 2: 1, 0: "tie"}[top] if n >= 2 else "tie"  # three different votes: no majority
    prompt = _text(line, "instruction") + (f"\n\n{_text(line, 'input')}" if d.get("input") else "")
    drop = ("idx", "instruction", "input", "response1", "response2")
    return _as_ours(line, prompt, _text(line, "response1"), _text(line, "response2"), label, drop, d.get("idx", d.get("id")))


def _llmbar(line: Line) -> Item:
    d = line.data
    if d.get("label") not in (1, 2):
        raise RlhfError(f"{line.where}: 'label' must be 1 (output_1 better) or 2, got {d.get('label')!r}")
    a, b = _text(line, "output_1"), _text(line, "output_2")
    return _as_ours(line, _text(line, "input"), a, b, d["label"] - 1, ("input", "output_1", "output_2", "label"))


# ---------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Label:
    id: str | int
    prompt: str
    a: str
    b: str
    cls: int  # 0 = a better, 1 = b better, 2 = tie
    where: str


def read_labels(spec: str) -> tuple[str, list[Label]]:
    """`--against [FORMAT:]PATH` -> (format, labels); format from the fields unless named."""
    fmt, sep, path = spec.partition(":")
    if not (sep and fmt in FORMATS):
        fmt, path = "", spec
    fmt, items = read_items(path, fmt or None)
    if fmt == "samples":
        raise RlhfError(f"--against {spec}: rows have no 'label'", f"label files: {', '.join(FORMATS)} (see `rlhf pairwise --help`)")
    labels = []
    for it in items:
        lab = it.row.get("label")
        if lab not in (0, 1, "tie") or isinstance(lab, bool):
            raise RlhfError(f"{it.where}: 'label' must be 0 (first better), 1 (second better) or \"tie\", got {lab!r}")
        if len(it.completions) != 2:
            raise RlhfError(f"{it.where}: a labelled row needs exactly 2 completions, got {len(it.completions)}")
        labels.append(Label(it.id, it.prompt, it.completions[0], it.completions[1], TIE if lab == "tie" else lab, it.where))
    return fmt, labels


class LabelIndex:
    """Finds the human label of a judged pair, by id or by content."""

    def __init__(self, labels: Sequence[Label]) -> None:
        self.labels = list(labels)
        self.by_id: dict[str, list[Label]] = {}
        self.by_content: dict[tuple[str, str, str], Label] = {}
        for lab in self.labels:
            self.by_id.setdefault(str(lab.id), []).append(lab)
            self.by_content.setdefault((lab.prompt, lab.a, lab.b), lab)

    def find(self, item: Item, x: int, y: int) -> int | None:
        """The label's class for completions (x, y) of `item`: 0 = x better, 1 = y, 2 = tie."""
        cx, cy = item.completions[x], item.completions[y]
        found = [*self.by_id.get(str(item.id), ()), *filter(None, (self.by_content.get((item.prompt, cx, cy)),
                                                                    self.by_content.get((item.prompt, cy, cx))))]
        for lab in found:
            if (lab.a, lab.b) == (cx, cy):
                return lab.cls
            if (lab.a, lab.b) == (cy, cx):
                return lab.cls if lab.cls == TIE else 1 - lab.cls
        return None


# ---------------------------------------------------------------------------------- statistics


def accuracy(judge: Sequence[int], human: Sequence[int]) -> float:
    return sum(j == h for j, h in zip(judge, human, strict=True)) / len(judge)


def cohen_kappa(judge: Sequence[int], human: Sequence[int], classes: int = 3) -> float:
    """Cohen's kappa = (p_o - p_e) / (1 - p_e): observed agreement p_o corrected for the agreement
    p_e = sum_c P(judge=c) P(human=c) expected from the two marginals alone. NaN when p_e = 1
    (both raters used one class only)."""
    n = len(judge)
    p_o = accuracy(judge, human)
    p_e = sum((sum(j == c for j in judge) / n) * (sum(h == c for h in human) / n) for c in range(classes))
    return float("nan") if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def bootstrap_ci(judge: Sequence[int], human: Sequence[int], classes: int, resamples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Percentile-bootstrap 95% intervals of accuracy and kappa (pairs resampled with replacement).

    Vectorised: idx (B, n) draws, then per-resample class shares (B, classes) for the marginals.
    """
    import numpy as np

    j, h = np.asarray(judge), np.asarray(human)
    idx = np.random.default_rng(seed).integers(0, len(j), size=(resamples, len(j)))
    jb, hb = j[idx], h[idx]  # (B, n)
    p_o = (jb == hb).mean(axis=1)  # (B,)
    p_e = sum((jb == c).mean(axis=1) * (hb == c).mean(axis=1) for c in range(classes))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(p_e < 1.0, (p_o - p_e) / (1.0 - p_e), np.nan)

    def ci(x: Any) -> list[float]:
        x = x[~np.isnan(x)]
        return [float(v) for v in np.percentile(x, [2.5, 97.5])] if len(x) else [math.nan, math.nan]

    return {"accuracy_ci": ci(p_o), "kappa_ci": ci(kappa)}


def agreement_report(pairs: Sequence[tuple[int, int]], resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """(judge class, human class) per matched pair -> accuracy, kappa and their 95% intervals.

    With ties among the human labels, ties are a third class and every matched pair counts. Without
    (LLMBar, MT-Bench human, ...), the statistics cover the pairs the judge decided, and
    `coverage` says what share that is; `accuracy_ties_half` counts the judge's ties as half right
    over all matched pairs, which compares single-order and both-orders runs fairly.
    """
    human_ties = any(h == TIE for _, h in pairs)
    used = list(pairs) if human_ties else [(j, h) for j, h in pairs if j != TIE]
    out: dict[str, Any] = {"matched": len(pairs), "n": len(used), "classes": 3 if human_ties else 2,
                           "judge_ties": sum(j == TIE for j, _ in pairs), "human_ties": sum(h == TIE for _, h in pairs)}
    if not human_ties and pairs:
        out["coverage"] = len(used) / len(pairs)
        out["accuracy_ties_half"] = sum(1.0 if j == h else 0.5 if j == TIE else 0.0 for j, h in pairs) / len(pairs)
    if not used:
        return {**out, "accuracy": None, "kappa": None, "accuracy_ci": None, "kappa_ci": None}
    js, hs = [j for j, _ in used], [h for _, h in used]
    kappa = cohen_kappa(js, hs, out["classes"])
    out.update(accuracy=accuracy(js, hs), kappa=None if math.isnan(kappa) else kappa, resamples=resamples)
    out.update(bootstrap_ci(js, hs, out["classes"], resamples, seed))
    return out
