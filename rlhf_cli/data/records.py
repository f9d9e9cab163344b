"""The JSONL record contract shared by every step. Later steps extend this table.

| step            | reads                                                        | writes                               |
|-----------------|--------------------------------------------------------------|--------------------------------------|
| `sft`           | `{"prompt", "completion"}` / `{"messages": [...]}` / `{"text"}` | checkpoint directory              |
| `sample`        | `{"prompt"}` or `{"messages": [...]}`, optional `id`          | input row + `completions` + ...      |
| `pairwise`      | sample rows (`prompt`/`messages` + `completions`, K >= 2)     | pair rows, or ranking rows           |
| `train-rm`      | pair rows, ranking rows, HH-RLHF / TRL preference pairs       | checkpoint directory                 |

SFT rows
    `{"prompt": str, "completion": str}`  loss on completion tokens only.
    `{"messages": [{"role": str, "content": str}, ...]}`  loss on assistant turns only.
    `{"text": str}`  plain language modelling (pretraining replay): loss on every token.
    An optional `"weight"`-free design: mixtures are weighted per file (`--data FILE:WEIGHT`).

Prompt rows (`sample`)
    `{"prompt": str}` or `{"messages": [...]}`; `id` (str or int) is kept, else a stable one is
    assigned from the content. **Every other field passes through untouched.**

Sample rows (output of `sample`, one per prompt)
    the input fields, plus
    `id`                  the prompt's id (kept or assigned)
    `completions`         list of K strings
    `finish_reasons`      list of K, each "stop" (EOS or a stop string) or "length"
    `completion_tokens`   list of K token counts
    `prompt_tokens`       token count of the rendered prompt
    `sampling`            {"model", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "n", "stop"}
    with `--logprobs`: `completion_token_ids` and `logprobs` (K lists, one float per token: the
    log-probability of the sampled token under the model's raw distribution, temperature 1).

Pair rows (output of `pairwise`, input of `train-rm`, one per decided pair)
    `id`                  "<prompt id>:<i>-<j>", i and j the completion indices of chosen, rejected
    `prompt` / `messages` as in the sample row
    `chosen`, `rejected`  the two completion strings
    `margin`              optional float: score judges the score difference, lm judges 2*P(chosen)-1
                          (none on `--flip-prob` flipped rows: it would give the flip away)
    `tie`                 true on the rows `--keep-ties` writes (then chosen/rejected are in index order)
    `judge`               provenance {"kind", "name", "verdicts" (winner per order asked), "shown"
                          ([first, second] completion indices per order), "p_chosen", "cost", "cached",
                          "orders", ...}; score judges give "scores" [chosen, rejected] instead
    plus the sample row's other fields (all but completions, finish_reasons, completion_tokens,
    completion_token_ids, logprobs).

Ranking rows (`pairwise --ranking`, input of `train-rm`, one per prompt)
    `{"id", "prompt" (or "messages"), "ranking": [[best, ...], ..., [worst, ...]], "judge"}`: groups of
    completion strings, best first; completions in one group are tied. `train-rm` also accepts a
    flat list of strings (no ties). Other fields pass through as for pair rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from rlhf_cli.data.jsonl import Line
from rlhf_cli.errors import RlhfError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")  # `tool` turns need tool_calls / tool_call_id, which rows do not carry

SFT_SHAPES = '{"prompt": str, "completion": str}, {"messages": [{"role", "content"}, ...]} or {"text": str}'
PROMPT_SHAPES = '{"prompt": str} or {"messages": [{"role", "content"}, ...]}'


@dataclass(frozen=True)
class SftRow:
    """One validated SFT example."""

    kind: Literal["prompt", "messages", "text"]
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    where: str = ""


@dataclass(frozen=True)
class PromptRow:
    """One validated prompt for `sample`; `extra` is the whole input row (passed through)."""

    id: str | int
    prompt: str | None
    messages: tuple[Message, ...] | None
    extra: dict[str, Any]
    where: str = ""


@dataclass(frozen=True)
class Item:
    """One sample row under judgement: a prompt and its K completions.

    `prompt` is the user-visible prompt text (for `messages` rows, the conversation rendered as
    plain text; `messages` keeps the structure for judges that want it). `row` is the whole input
    row: a judge may read reference fields from it (`answer`), never write to it.
    """

    id: str | int
    prompt: str
    completions: tuple[str, ...]
    row: dict[str, Any]
    messages: tuple[dict[str, str], ...] | None = None
    where: str = ""


def _need_str(line: Line, key: str) -> str:
    value = line.data[key]
    if not isinstance(value, str):
        raise RlhfError(f"{line.where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_messages(line: Line) -> tuple[Message, ...]:
    """The row's `messages` list, checked: a non-empty list of {"role": str, "content": str}."""
    msgs = line.data["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RlhfError(f"{line.where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RlhfError(
                f"{line.where}: messages[{i}] must be {{\"role\": str, \"content\": str}}, got {orjson.dumps(m).decode()[:80]}"
            )
        check_role(line.where, f"messages[{i}]", m["role"])
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def check_role(where: str, name: str, role: str) -> None:
    """Only the roles every chat template knows: another one ("robot", "human", a typo) would
    render as a turn the model never saw, or be dropped by the template, and train silently."""
    if role not in ROLES:
        raise RlhfError(f"{where}: {name} has role {role!r}", "roles are system, user and assistant")


def parse_sft_row(line: Line) -> SftRow:
    """Validate one SFT row against the contract, naming `file:line` on failure."""
    d = line.data
    if "messages" in d:
        msgs = parse_messages(line)
        if not any(m["role"] == "assistant" for m in msgs):
            raise RlhfError(f"{line.where}: 'messages' has no assistant turn, so there is nothing to learn")
        return SftRow("messages", messages=msgs, where=line.where)
    if "prompt" in d or "completion" in d:
        for key in ("prompt", "completion"):
            if key not in d:
                raise RlhfError(f"{line.where}: missing field '{key}', expected {SFT_SHAPES}")
        completion = _need_str(line, "completion")
        if not completion:
            raise RlhfError(f"{line.where}: 'completion' is empty, so there is nothing to learn")
        return SftRow("prompt", prompt=_need_str(line, "prompt"), completion=completion, where=line.where)
    if "text" in d:
        text = _need_str(line, "text")
        if not text:
            raise RlhfError(f"{line.where}: 'text' is empty")
        return SftRow("text", text=text, where=line.where)
    raise RlhfError(f"{line.where}: no 'prompt'/'completion', 'messages' or 'text' field, expected {SFT_SHAPES}")


def parse_prompt_row(line: Line) -> PromptRow:
    """Validate one prompt row; the id is kept if present (str or int) and filled in later if not."""
    d = line.data
    if "id" in d and (isinstance(d["id"], bool) or not isinstance(d["id"], (str, int))):
        raise RlhfError(f"{line.where}: field 'id' must be a string or integer, got {type(d['id']).__name__}")
    if "messages" in d:
        return PromptRow(d.get("id", ""), None, parse_messages(line), d, line.where)
    if "prompt" in d:
        return PromptRow(d.get("id", ""), _need_str(line, "prompt"), None, d, line.where)
    raise RlhfError(f"{line.where}: no 'prompt' or 'messages' field, expected {PROMPT_SHAPES}")


def content_id(row: PromptRow) -> str:
    """A stable id from the prompt's content: the same prompt file gives the same ids every run."""
    payload = orjson.dumps(row.prompt if row.prompt is not None else list(row.messages or ()))
    return hashlib.sha256(payload).hexdigest()[:12]


def assign_ids(rows: list[PromptRow]) -> list[PromptRow]:
    """Fill in missing ids (content hash, `-2`, `-3` ... for repeats) and reject duplicate given ids.

    Given ids are collected first, so an assigned hash never collides with an id the user wrote.
    """
    given: dict[str | int, str] = {}
    for row in rows:
        if "id" in row.extra:
            if row.id in given:
                raise RlhfError(f"{row.where}: duplicate id {row.id!r} (first at {given[row.id]})", "ids must be unique")
            given[row.id] = row.where
    taken: set[str | int] = set(given)
    out = []
    for row in rows:
        rid: str | int = row.id
        if "id" not in row.extra:
            base = content_id(row)
            rid, k = base, 1
            while rid in taken:
                k += 1
                rid = f"{base}-{k}"
            taken.add(rid)
        out.append(PromptRow(rid, row.prompt, row.messages, row.extra, row.where))
    return out


SAMPLE_SHAPE = '{"prompt": str (or "messages": [...]), "completions": [str, str, ...]}'


def render_messages(messages: tuple[Message, ...]) -> str:
    """Plain text of a conversation for judges that read text: a lone user turn is its content,
    anything longer is "Role: content" blocks separated by blank lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def render_prompt(tok: Any, prompt: str | None, messages: Any, fmt: str) -> list[int]:
    """Prompt token ids for a model: chat template + generation prompt, or raw text (BOS if the model uses one)."""
    if messages is not None or fmt == "chat":
        msgs = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"]


def parse_sample_row(line: Line, min_completions: int = 2) -> Item:
    """Validate one sample row (a prompt row + `completions`, K >= 2 strings; `select` takes K >= 1)
    into a judge `Item`.

    The id is kept if given; rows without one get it from `assign_item_ids` (the same content hash
    `sample` would have assigned).
    """
    prow = parse_prompt_row(line)
    comps = line.data.get("completions")
    if comps is None:
        raise RlhfError(f"{line.where}: no 'completions' field, expected {SAMPLE_SHAPE}", "make sample rows with `rlhf sample -n K`")
    if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
        raise RlhfError(f"{line.where}: 'completions' must be a list of strings, expected {SAMPLE_SHAPE}")
    if len(comps) < min_completions:
        need = "comparing needs at least 2" if min_completions == 2 else f"at least {min_completions} needed"
        raise RlhfError(f"{line.where}: 'completions' has {len(comps)} string(s); {need}", f"sample with -n {min_completions} or more")
    prompt = _need_str(line, "prompt") if prow.messages is None else render_messages(prow.messages)
    return Item(prow.id, prompt, tuple(comps), line.data, prow.messages, line.where)


def assign_item_ids(items: list[Item]) -> list[Item]:
    """`assign_ids` for sample rows: keep given ids, hash the prompt for the rest, reject duplicates."""
    rows = [PromptRow(it.id, it.prompt if it.messages is None else None, it.messages, it.row, it.where) for it in items]
    return [
        Item(row.id, it.prompt, it.completions, it.row, it.messages, it.where)
        for row, it in zip(assign_ids(rows), items, strict=True)
    ]
