"""SFT rows -> token ids + loss masks -> a deterministic plan of (packed or padded) microbatches.

Rendering (`--format`)
    chat  prompt/completion rows become [user: prompt, assistant: completion] and go through the
          tokenizer's chat template (ChatML if it has none); the loss covers each assistant turn up
          to and including its end-of-turn token.
    raw   prompt/completion rows are `prompt + completion + EOS` as plain text.
    `text` rows are always plain text + EOS with loss on every token.

Assistant spans are found by rendering the conversation prefix by prefix: the tokens that
`render(messages[:i+1])` adds over `render(messages[:i], add_generation_prompt=True)` are turn i's
reply. A template for which that is not a prefix (it rewrites earlier turns) cannot mark assistant
turns: that is an error naming the row, never a silent all-zero mask.

Mixtures: `--data FILE:WEIGHT` contributes round(WEIGHT * rows) examples to every epoch (whole
copies first, then a seeded sample of the remainder), so 0.5 is half the file and 2 is each row twice.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

from rlhf_cli.console import warn
from rlhf_cli.data.records import SftRow
from rlhf_cli.errors import RlhfError


class Example(NamedTuple):
    ids: list[int]
    mask: list[int]  # 1 where this token is a target (its logit is trained), same length as ids
    where: str


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def render_chat(tok: Any, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """Token ids of a chat and the 0/1 mask of its assistant replies."""
    full = _ids(tok, tok.apply_chat_template(messages, tokenize=False))
    mask = [0] * len(full)
    eos = set(_eos_ids(tok))
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _ids(tok, tok.apply_chat_template(messages[: i + 1], tokenize=False))
        if i:
            before = _ids(tok, tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        else:
            before = _opening_header(tok, upto)
        if full[: len(upto)] != upto or upto[: len(before)] != before:
            raise RlhfError(
                f"{where}: the chat template does not render turns as prefixes, so assistant tokens cannot be marked",
                "use --format raw, or a tokenizer whose chat template appends turns",
            )
        end = len(upto)
        # stop the span at the turn's end-of-turn token: the newline after it is formatting
        for j in range(len(upto) - 1, len(before) - 1, -1):
            if upto[j] in eos:
                end = j + 1
                break
        for j in range(len(before), end):
            mask[j] = 1
    return full, mask


def _opening_header(tok: Any, upto: list[int]) -> list[int]:
    """The assistant header that starts a conversation opening with an assistant turn, so that turn
    does not train on it. transformers refuses to render zero messages, so the header is what the
    generation prompt adds after a probe turn; [] if the conversation does not start with it."""
    probe = [{"role": "user", "content": ""}]
    plain = tok.apply_chat_template(probe, tokenize=False)
    prompted = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    header = _ids(tok, prompted[len(plain) :]) if prompted.startswith(plain) else []
    return header if upto[: len(header)] == header else []


def _eos_ids(tok: Any) -> list[int]:
    ids = {tok.eos_token_id}
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id:
            ids.add(tid)
    return [i for i in ids if i is not None]


def tokenize_row(tok: Any, row: SftRow, fmt: str) -> Example:
    """One SFT row -> Example (not yet truncated)."""
    if row.kind == "text":
        ids = _ids(tok, row.text or "") + [tok.eos_token_id]
        return Example(ids, [1] * len(ids), row.where)
    if row.kind == "prompt" and fmt == "raw":
        p = ([tok.bos_token_id] if _adds_bos(tok) else []) + _ids(tok, row.prompt or "")
        c = _ids(tok, row.completion or "") + [tok.eos_token_id]
        return Example(p + c, [0] * len(p) + [1] * len(c), row.where)
    messages = list(row.messages) if row.messages else [
        {"role": "user", "content": row.prompt or ""},
        {"role": "assistant", "content": row.completion or ""},
    ]
    ids, mask = render_chat(tok, messages, row.where)
    return Example(ids, mask, row.where)


def _adds_bos(tok: Any) -> bool:
    return tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]


def tokenize_rows(tok: Any, rows: list[SftRow], fmt: str, max_len: int) -> list[Example]:
    """Tokenize and right-truncate to `max_len`; rows left with no target token are dropped loudly."""
    out, cut, empty = [], 0, []
    for row in rows:
        ex = tokenize_row(tok, row, fmt)
        if len(ex.ids) > max_len:
            cut += 1
            ex = Example(ex.ids[:max_len], ex.mask[:max_len], ex.where)
        # position 0 has no previous token, so a mask only on token 0 still trains nothing
        if sum(ex.mask[1:]) == 0:
            empty.append(ex.where)
            continue
        out.append(ex)
    if cut:
        warn(f"{cut} of {len(rows)} rows were longer than --max-len {max_len} and were truncated")
    if empty:
        warn(f"{len(empty)} rows have no target token after truncation and were DROPPED (first: {empty[0]}); raise --max-len")
    if not out:
        raise RlhfError(f"{rows[0].where.rsplit(':', 1)[0]}: no row has a target token left", "raise --max-len")
    return out


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class Source:
    examples: list[Example]
    weight: float


def epoch_examples(sources: list[Source], seed: int, epoch: int) -> list[Example]:
    """The shuffled examples of one epoch of the mixture (see module docstring for weights)."""
    rng = random.Random(f"{seed}:{epoch}")
    chosen: list[Example] = []
    for src in sources:
        count = round(src.weight * len(src.examples))
        whole, rest = divmod(count, len(src.examples))
        chosen.extend(src.examples * whole)
        chosen.extend(rng.sample(src.examples, rest))
    rng.shuffle(chosen)
    return chosen


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: indices of `lengths` grouped into rows of <= capacity tokens."""
    if lengths and max(lengths) > capacity:
        raise ValueError(f"an item of length {max(lengths)} cannot fit a row of {capacity} (truncate first)")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in order:
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
        else:
            cap, r = free.pop(j)
            rows[r].append(i)
            bisect.insort(free, (cap - lengths[i], r))
    return rows


Row = list[Example]  # one sequence of the batch: several examples when packed, one when padded
Microbatch = list[Row]


def plan_epoch(sources: list[Source], seed: int, epoch: int, batch_size: int, max_len: int, packing: bool) -> list[Microbatch]:
    """Microbatches of one epoch, `batch_size` rows each (packed rows or single examples), seeded."""
    exs = epoch_examples(sources, seed, epoch)
    if packing:
        groups = pack_best_fit([len(e.ids) for e in exs], max_len)
        random.Random(f"{seed}:{epoch}:rows").shuffle(groups)  # BFD sorts by length; undo that bias
        rows: list[Row] = [[exs[i] for i in g] for g in groups]
    else:
        rows = [[e] for e in exs]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def target_count(mb: Microbatch) -> int:
    """Number of supervised next-token predictions in a microbatch (the loss's denominator)."""
    return sum(sum(e.mask[1:]) for row in mb for e in row)


def token_count(mb: Microbatch) -> int:
    return sum(len(e.ids) for row in mb for e in row)


# ---------------------------------------------------------------- collation


def collate(mb: Microbatch, pad_id: int) -> dict[str, Any]:
    """Tensors for one microbatch, all (B, T).

    A row of several examples is packed padding-free: examples lie end to end, `position_ids`
    restart at 0 for each, and no attention mask is passed, so transformers builds a
    block-diagonal causal mask (no attention across example boundaries). Short rows are filled
    with pad tokens that have their own restarting positions and no loss, so they touch nothing.
    If every row is a single example we pass a classic right-padding attention mask instead.
    labels hold the token id where the mask is 1 and -100 elsewhere, and always -100 on each
    example's first token: in a packed row the token before it is the previous example's last,
    and that prediction crosses the boundary (an unpacked example has no such target either).
    """
    import torch

    width = max(sum(len(e.ids) for e in row) for row in mb)
    ids, pos, lab, att = [], [], [], []
    for row in mb:
        r_ids = [t for e in row for t in e.ids]
        fill = width - len(r_ids)
        ids.append(r_ids + [pad_id] * fill)
        pos.append([p for e in row for p in range(len(e.ids))] + list(range(fill)))
        lab.append([t if m and j else -100 for e in row for j, (t, m) in enumerate(zip(e.ids, e.mask, strict=True))] + [-100] * fill)
        att.append([1] * len(r_ids) + [0] * fill)
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(lab)}
    if any(len(row) > 1 for row in mb):
        batch["position_ids"] = torch.tensor(pos)
    else:
        batch["attention_mask"] = torch.tensor(att)
    return batch


class SftStream:
    """An endless seeded stream of SFT microbatches (PPO-ptx: one per PPO minibatch), sharded by rank.

    Each pass over the examples is a fresh seeded shuffle; every rank draws the same `size` examples
    and keeps its share, so the global ptx batch matches the global PPO minibatch.
    """

    def __init__(self, tok: Any, rows: list[SftRow], fmt: str, max_len: int, size: int, seed: int, dist: Any, device: str) -> None:
        self.examples = tokenize_rows(tok, rows, fmt, max_len)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.size, self.seed, self.dist, self.device = size, seed, dist, device
        self.epoch, self.pos, self.order = 0, 0, self._order(0)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}:ptx:{epoch}").shuffle(order)
        return order

    def next(self) -> dict[str, Any]:
        picked = []
        for _ in range(self.size):
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            picked.append(self.examples[self.order[self.pos]])
            self.pos += 1
        batch = collate([[e] for e in picked[self.dist.rank :: self.dist.world]], self.pad)
        return {k: v.to(self.device) for k, v in batch.items()}
