"""Human-labelled pairwise sets, read as our own sample rows (judge `Item`s with a `label`).

Label files, detected from their fields (or named: `--against pandalm:PATH`):

| format   | file                                                        | fields                                                   |
|----------|-------------------------------------------------------------|----------------------------------------------------------|
| `pandalm`| PandaLM `testset-v1.json` (JSON array)                      | `idx`, `instruction`, `input`, `response1`, `response2`, `annotator1..3` (1, 2, 0 = tie; majority) |
| `llmbar` | LLMBar, and its Processed MT-Bench / FairEval / LLMEval2 `dataset.json` | `input`, `output_1`, `output_2`, `label` (1 or 2) |
| `jsonl`  | ours, JSONL or a JSON array                                 | `{"id"?, "prompt" (or "messages"), "completions": [a, b], "label": 0 \\| 1 \\| "tie"}` |

Every format becomes our own form (label 0 = the first completion is better, 1 = the second,
"tie"), so a label file is also valid `rlhf pairwise` input:

    rlhf pairwise ../shared/data/pandalm/testset-v1.json --judge lm:M --against ../shared/data/pandalm/testset-v1.json

Matching verdicts to these labels and the agreement statistics live in judges/agreement.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rlhf_cli.data.jsonl import Line, load_records
from rlhf_cli.data.records import Item, assign_item_ids, parse_sample_row
from rlhf_cli.errors import RlhfError

FORMATS = ("pandalm", "llmbar", "jsonl")


def detect_format(d: dict[str, Any]) -> str | None:
    """'pandalm' / 'llmbar' / 'jsonl' (labelled) / 'samples' (unlabelled sample rows) / None."""
    if "response1" in d and "annotator1" in d:
        return "pandalm"
    if "output_1" in d and "output_2" in d:
        return "llmbar"
    if "completions" in d:
        return "jsonl" if "label" in d else "samples"
    return None


def read_items(path: str, fmt: str | None = None, min_completions: int = 2) -> tuple[str, list[Item]]:
    """Sample rows or a labelled set (any format above) as judge Items with ids assigned."""
    lines = load_records(path)
    fmt = fmt or detect_format(lines[0].data) or "samples"
    if fmt == "pandalm":
        items = [_pandalm(line) for line in lines]
    elif fmt == "llmbar":
        items = [_llmbar(line) for line in lines]
    else:
        items = [parse_sample_row(line, min_completions) for line in lines]
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
    ours: dict[object, int | str] = {1: 0, 2: 1, 0: "tie"}  # a PandaLM vote as our label
    label = ours[top] if n >= 2 else "tie"  # three different votes: no majority
    prompt = _text(line, "instruction") + (f"\n\n{_text(line, 'input')}" if d.get("input") else "")
    drop = ("idx", "instruction", "input", "response1", "response2")
    return _as_ours(line, prompt, _text(line, "response1"), _text(line, "response2"), label, drop, d.get("idx", d.get("id")))


def _llmbar(line: Line) -> Item:
    d = line.data
    if d.get("label") not in (1, 2):
        raise RlhfError(f"{line.where}: 'label' must be 1 (output_1 better) or 2, got {d.get('label')!r}")
    a, b = _text(line, "output_1"), _text(line, "output_2")
    return _as_ours(line, _text(line, "input"), a, b, d["label"] - 1, ("input", "output_1", "output_2", "label"))
