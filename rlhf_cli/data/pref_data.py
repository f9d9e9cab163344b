"""Preference rows (train-rm input) -> typed `PrefRow` -> token ids of every completion -> padded batches.

Layouts, one JSON object per line (anything else in a row is ignored):

    pair        {"prompt": str | [messages], "chosen": str, "rejected": str, "margin": float (optional)}
                rows with "tie": true (`pairwise --keep-ties`) state no preference and are skipped
                also {"messages": [...], "chosen", "rejected"}, and TRL's explicit conversational form
                where chosen / rejected are [{"role": "assistant", "content": str}]
    ranking     {"prompt" | "messages", "ranking": [[best, ...], [...], ..., [worst, ...]]}: groups of
                completions, best first, ties share a group; a flat list of strings means no ties
    HH-RLHF     {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}: two full transcripts
                sharing the dialogue; the prompt is their common prefix up to and including the last
                "\\n\\nAssistant:", the completions are what follows (plain text, no chat template)
    implicit    TRL's implicit-prompt form with no "prompt" field: chosen / rejected as message lists
                that share a prefix and end in one differing assistant turn (chat template), or as
                plain strings (prompt = the common prefix, cut back to a whitespace boundary)

Every sequence is `prompt ids + completion ids + EOS`: the prompt rendered as `rlhf sample` renders
it (chat template + generation prompt, or raw text), the completion as the policy would emit it,
closed by EOS so the reward is read at a real end-of-answer token (models/reward.py). Too-long
sequences lose prompt tokens from the left (counted loudly); a row whose completion alone cannot fit
`--max-len` is dropped (loudly).

    rows = [parse_pref_row(line) for line in read_jsonl("prefs.jsonl")]
    examples = tokenize_prefs(tok, rows, "chat", 512)
    batch = collate(examples[:8], tok.pad_token_id, use_margin=True)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

from rlhf_cli.console import warn
from rlhf_cli.data.jsonl import Line
from rlhf_cli.data.records import Message, check_role, parse_messages, render_prompt
from rlhf_cli.errors import RlhfError

PREF_SHAPES = (
    '{"prompt", "chosen", "rejected"[, "margin"]}, {"prompt", "ranking": [[best...], ..., [worst...]]}, '
    'HH-RLHF {"chosen", "rejected"} transcripts, or chosen/rejected message lists'
)
ASSISTANT = "\n\nAssistant:"  # the HH-RLHF turn marker
HUMAN = "\n\nHuman:"


@dataclass(frozen=True)
class PrefRow:
    """One validated preference row: completions in `groups`, best group first (ties share a group).

    A pair row is `((chosen,), (rejected,))`. `raw` marks transcript layouts (HH-RLHF, implicit
    strings), whose prompt is plain text that must not go through the chat template.
    """

    groups: tuple[tuple[str, ...], ...]
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    margin: float | None = None
    raw: bool = False
    layout: str = "pair"  # pair | ranking | transcript | implicit | tie
    where: str = ""


class PrefExample(NamedTuple):
    seqs: list[list[int]]  # prompt + completion + EOS token ids, one per completion
    ranks: list[int]  # the group of each sequence: 0 = best
    margin: float  # 0.0 when the row has none
    where: str
    answer_lens: tuple[int, ...] = ()  # completion + EOS tokens at the end of each sequence (dpo scores only those)


# ---------------------------------------------------------------- parsing


def parse_pref_row(line: Line) -> PrefRow:
    """Validate one preference row against the layouts above, naming `file:line` on failure."""
    d = line.data
    if "ranking" in d:
        if "chosen" in d or "rejected" in d:
            raise RlhfError(f"{line.where}: row has both 'ranking' and 'chosen'/'rejected'", "give one layout per row")
        prompt, messages = _prompt(line, required=True)
        return PrefRow(_ranking(line), prompt, messages, None, False, "ranking", line.where)
    if "chosen" not in d or "rejected" not in d:
        missing = "rejected" if "chosen" in d else "chosen"
        if "chosen" in d or "rejected" in d:
            raise RlhfError(f"{line.where}: missing field '{missing}', expected {PREF_SHAPES}")
        raise RlhfError(f"{line.where}: no 'chosen'/'rejected' or 'ranking' field, expected {PREF_SHAPES}")
    margin = _margin(line)
    chosen, rejected = d["chosen"], d["rejected"]
    if "prompt" in d or "messages" in d:
        prompt, messages = _prompt(line, required=True)
        c, r = _completion(line, "chosen"), _completion(line, "rejected")
        if d.get("tie") is True:  # `pairwise --keep-ties`: the two are in index order, neither preferred
            return PrefRow(((c, r),), prompt, messages, None, False, "tie", line.where)
        return PrefRow(((c,), (r,)), prompt, messages, margin, False, "pair", line.where)
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, c, r, layout = split_transcripts(chosen, rejected, line.where)
        return PrefRow(((c,), (r,)), prompt, None, margin, True, layout, line.where)
    if isinstance(chosen, list) and isinstance(rejected, list):
        messages, c, r = _split_conversations(line)
        return PrefRow(((c,), (r,)), None, messages, margin, False, "implicit", line.where)
    raise RlhfError(
        f"{line.where}: 'chosen' and 'rejected' must both be strings or both be message lists, "
        f"got {type(chosen).__name__} and {type(rejected).__name__}"
    )


def _prompt(line: Line, required: bool) -> tuple[str | None, tuple[Message, ...] | None]:
    d = line.data
    if "messages" in d:
        return None, parse_messages(line)
    value = d.get("prompt")
    if isinstance(value, str):
        return value, None
    if isinstance(value, list):  # TRL's conversational prompt
        return None, parse_messages(Line({"messages": value}, line.path, line.lineno))
    if value is None and not required:
        return None, None
    raise RlhfError(f"{line.where}: field 'prompt' must be a string or a message list, got {type(value).__name__}")


def _completion(line: Line, key: str) -> str:
    """A pair completion: a string, or TRL's [{"role": "assistant", "content": str}]."""
    value = line.data[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and _is_message(value[0]) and value[0]["role"] == "assistant":
        return value[0]["content"]
    raise RlhfError(
        f"{line.where}: field '{key}' must be a string or one assistant message, got {str(value)[:60]!r}",
        "with a 'prompt' field, chosen/rejected hold only the answer",
    )


def _margin(line: Line) -> float | None:
    if "margin" not in line.data or line.data["margin"] is None:
        return None
    m = line.data["margin"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise RlhfError(f"{line.where}: 'margin' must be a finite number, got {m!r}")
    return float(m)


def _ranking(line: Line) -> tuple[tuple[str, ...], ...]:
    rk = line.data["ranking"]
    hint = 'e.g. "ranking": [["best"], ["tied", "tied too"], ["worst"]] or ["best", "middle", "worst"]'
    if not isinstance(rk, list) or not rk:
        raise RlhfError(f"{line.where}: 'ranking' must be a non-empty list of groups, best first", hint)
    if all(isinstance(x, str) for x in rk):
        groups = tuple((x,) for x in rk)
    elif all(isinstance(g, list) and g and all(isinstance(x, str) for x in g) for g in rk):
        groups = tuple(tuple(g) for g in rk)
    else:
        raise RlhfError(f"{line.where}: 'ranking' must be a list of strings or a list of non-empty string lists", hint)
    if len(groups) < 2:
        raise RlhfError(f"{line.where}: 'ranking' has a single group, so nothing is preferred to anything", hint)
    return groups


def split_transcripts(chosen: str, rejected: str, where: str) -> tuple[str, str, str, str]:
    """(prompt, chosen tail, rejected tail, layout) of two full texts sharing a prefix.

    HH-RLHF (Bai et al. 2022): the prompt is the common prefix up to and including the last
    "\\n\\nAssistant:" marker in it. Other strings (TRL's implicit prompt): the common prefix cut back
    to its last whitespace, so no word is split between prompt and completion tokens.
    """
    common = os.path.commonprefix([chosen, rejected])
    if HUMAN in chosen or ASSISTANT in chosen:
        cut = common.rfind(ASSISTANT)
        if cut < 0:
            raise RlhfError(
                f"{where}: HH-RLHF transcripts must share the dialogue up to the last '\\n\\nAssistant:', these differ earlier",
                "chosen and rejected should differ only in the final assistant turn",
            )
        end = cut + len(ASSISTANT)
        return chosen[:end], chosen[end:], rejected[end:], "transcript"
    end = max(common.rfind(" "), common.rfind("\n"), 0)
    return chosen[:end], chosen[end:], rejected[end:], "implicit"


def _split_conversations(line: Line) -> tuple[tuple[Message, ...], str, str]:
    """TRL implicit prompt, conversational: shared messages, then one differing assistant turn each."""
    chosen, rejected = _message_list(line, "chosen"), _message_list(line, "rejected")
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    tails = chosen[k:], rejected[k:]
    if k == 0 or any(len(t) != 1 or t[0]["role"] != "assistant" for t in tails):
        raise RlhfError(
            f"{line.where}: chosen and rejected conversations must share their opening messages and end in one "
            "differing assistant turn",
            'or give the prompt explicitly: {"prompt", "chosen", "rejected"}',
        )
    return chosen[:k], tails[0][0]["content"], tails[1][0]["content"]


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _message_list(line: Line, key: str) -> tuple[Message, ...]:
    msgs = line.data[key]
    bad = next((i for i, m in enumerate(msgs) if not _is_message(m)), None)
    if not msgs or bad is not None:
        raise RlhfError(f"{line.where}: '{key}' must be a non-empty list of {{\"role\": str, \"content\": str}} messages"
                        + (f" (item {bad} is not)" if bad is not None else ""))
    for i, m in enumerate(msgs):
        check_role(line.where, f"{key}[{i}]", m["role"])
    return tuple({"role": m["role"], "content": m["content"]} for m in msgs)


# ---------------------------------------------------------------- tokenization


def eos_id(tok: Any) -> int:
    eos = tok.eos_token_id if tok.eos_token_id is not None else getattr(tok, "sep_token_id", None)
    if eos is None:
        raise RlhfError("the tokenizer has no EOS (or SEP) token to end each sequence with", "use a model with an EOS token")
    return eos


def prompt_ids(tok: Any, prompt: str | None, messages: Any, fmt: str, raw: bool = False) -> list[int]:
    """The prompt as `rlhf sample` renders it: chat template + generation prompt, or plain text
    (with BOS when the tokenizer adds one). Transcript rows (`raw`) are always plain text.

    An encoder's tokenizer (BERT: `[CLS] text [SEP]`) starts every sequence with its [CLS] token:
    that is where the encoder's classification head reads (models/reward.py). An encoder with no
    chat template of its own (the ChatML default needs an EOS) must use the raw format."""
    lead = _lead_token(tok)
    if messages is not None or (fmt == "chat" and not raw):
        cls = getattr(tok, "cls_token_id", None)
        if tok.eos_token is None and cls is not None and "eos_token" in (getattr(tok, "chat_template", None) or ""):
            raise RlhfError("the model is an encoder (its tokenizer has [CLS] but no EOS), which has no chat template",
                            "pass --format raw (message-list prompts need a decoder with a chat template)")
        ids = render_prompt(tok, prompt, messages, "chat")
        return [cls, *ids] if cls is not None and lead == [cls] and ids[:1] != lead else ids
    return [*lead, *tok(prompt or "", add_special_tokens=False)["input_ids"]]


def _lead_token(tok: Any) -> list[int]:
    """[the special token the tokenizer opens every text with] (BOS, BERT's [CLS]), or []."""
    first = tok("a")["input_ids"][:1]
    return first if first and first[0] in (tok.bos_token_id, getattr(tok, "cls_token_id", None)) and first[0] is not None else []


def completion_ids(tok: Any, text: str) -> list[int]:
    """The completion's tokens closed by EOS (not doubled when the text already ends with it)."""
    eos = eos_id(tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids if ids[-1:] == [eos] else [*ids, eos]


def fit(prompt: list[int], completion: list[int], max_len: int | None) -> tuple[list[int], bool] | None:
    """prompt + completion cut to max_len by dropping prompt tokens from the left -> (ids, truncated);
    None when the completion leaves no room for a single prompt token."""
    if max_len is None or len(prompt) + len(completion) <= max_len:
        return prompt + completion, False
    room = max_len - len(completion)
    if room < 1 or not prompt:
        return None
    return prompt[len(prompt) - room :] + completion, True


def tokenize_prefs(tok: Any, rows: list[PrefRow], fmt: str, max_len: int) -> list[PrefExample]:
    """Token ids of every completion of every row; rows that cannot fit are dropped, loudly."""
    out: list[PrefExample] = []
    cut, too_long, same, ties = 0, [], [], []
    for row in rows:
        if len(row.groups) < 2:
            ties.append(row.where)
            continue
        if len(row.groups) == 2 and row.groups[0] == row.groups[1]:
            same.append(row.where)  # HH-RLHF has a few: there is no preference to learn
            continue
        p = prompt_ids(tok, row.prompt, row.messages, fmt, row.raw)
        seqs, ranks, lens, truncated = [], [], [], False
        for rank, group in enumerate(row.groups):
            for text in group:
                answer = completion_ids(tok, text)
                fitted = fit(p, answer, max_len)
                if fitted is None:
                    break
                seqs.append(fitted[0])
                ranks.append(rank)
                lens.append(len(answer))
                truncated |= fitted[1]
        if len(seqs) < sum(len(g) for g in row.groups):
            too_long.append(row.where)
            continue
        cut += truncated
        out.append(PrefExample(seqs, ranks, row.margin or 0.0, row.where, tuple(lens)))
    if cut:
        warn(f"{cut} of {len(rows)} rows were longer than --max-len {max_len}: their prompts were truncated from the left")
    if too_long:
        warn(f"{len(too_long)} rows have a completion that cannot fit --max-len {max_len} and were DROPPED (first: {too_long[0]}); raise --max-len")
    if same:
        warn(f"{len(same)} rows have identical chosen and rejected and were DROPPED (first: {same[0]})")
    if ties:
        warn(f"{len(ties)} tie rows (\"tie\": true, no preferred side) were skipped (first: {ties[0]})")
    if not out:
        raise RlhfError(f"{rows[0].where.rsplit(':', 1)[0]}: no preference row is left to train on", "raise --max-len")
    return out


# ---------------------------------------------------------------- batching


def collate(mb: list[PrefExample], pad_id: int, use_margin: bool = True, packing: bool = False, share_prompt: bool = False) -> dict[str, Any]:
    """One microbatch: every completion of every row as one right-padded sequence, plus the pairs.

    input_ids, attention_mask: (S, T), S = all completions of the rows; answer_mask (S, T) True on
    each sequence's completion + EOS tokens, answer_lens (S,) their counts. The preference pairs:
    better, worse (P,) index sequences, row (P,) says which row (prompt) a pair belongs to, margin
    (P,). A ranking row of K completions gives all its strictly ordered pairs (K choose 2 without
    ties) from only K sequences: InstructGPT's "one batch element per prompt".

    packing=True lays the same sequences out padding-free instead (pref_layouts.pack): input_ids, position_ids,
    seq_index, answer_mask (R, W) with R <= S rows no wider than the longest sequence, and no
    attention_mask. share_prompt=True lays each row out as its prompt once and its answers after it
    (pref_layouts.share_prompts). tokens: the non-padding tokens of the sequences (a shared prompt counted once
    per sequence, as the other layouts count it), whatever the layout.
    """
    import torch

    from rlhf_cli.data import pref_layouts
    from rlhf_cli.losses.rm import strict_pairs

    answer_lens: list[int] = []  # (S,)
    better: list[int] = []  # per strict pair: sequence indices and the example it belongs to
    worse: list[int] = []
    row: list[int] = []
    margin: list[float] = []
    for r, ex in enumerate(mb):
        base = len(answer_lens)
        answer_lens += list(ex.answer_lens) if ex.answer_lens else [0] * len(ex.seqs)
        for i, j in strict_pairs(ex.ranks):
            better.append(base + i)
            worse.append(base + j)
            row.append(r)
            margin.append(ex.margin if use_margin else 0.0)
    seqs = [s for ex in mb for s in ex.seqs]
    if share_prompt:
        tensors = pref_layouts.share_prompts(mb, pad_id)
    elif packing:
        tensors = pref_layouts.pack(seqs, answer_lens, pad_id)
    else:
        tensors = pref_layouts.pad(seqs, answer_lens, pad_id)
    return {
        **tensors, "answer_lens": torch.tensor(answer_lens, dtype=torch.float32), "tokens": token_count(mb),
        "better": torch.tensor(better), "worse": torch.tensor(worse), "row": torch.tensor(row),
        "margin": torch.tensor(margin, dtype=torch.float32), "n_rows": len(mb),
    }


def sequence_count(mb: list[PrefExample]) -> int:
    return sum(len(ex.seqs) for ex in mb)


def token_count(mb: list[PrefExample]) -> int:
    return sum(len(s) for ex in mb for s in ex.seqs)


def split_examples(train: list[Any], held_out: list[Any], eval_split: float, seed: int) -> tuple[list[Any], list[Any]]:
    """--eval-split holds out a seeded fraction of the rows (a ranking row stays whole)."""
    import random

    if not eval_split:
        return train, held_out
    pool = list(train)
    random.Random(f"{seed}:eval").shuffle(pool)
    n_eval = max(1, round(eval_split * len(pool)))
    if n_eval >= len(pool):
        raise RlhfError(f"--eval-split {eval_split} leaves no training rows out of {len(pool)}", "lower --eval-split or add rows")
    return pool[n_eval:], pool[:n_eval]


def epoch_batches(train: list[Any], seed: int, epoch: int, batch_size: int) -> list[list[Any]]:
    """One epoch's microbatches: a seeded shuffle of the rows, cut into --batch-size chunks."""
    import random

    rows = list(train)
    random.Random(f"{seed}:{epoch}").shuffle(rows)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
