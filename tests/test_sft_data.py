"""Unit tier: SFT tokenisation + loss masks (hand-checked bytes), mixtures, packing and collation.

The builtin tokenizer is byte-level, so ids are readable: 'h' = 104, 'i' = 105, '\\n' = 10, and the
specials are 256 <|endoftext|>, 257 <|im_start|>, 258 <|im_end|> (eos), 259 <|pad|>.
"""

from __future__ import annotations

import random

import pytest
import torch

from rlhf_cli.data import sft_data as sd
from rlhf_cli.data.records import SftRow
from rlhf_cli.errors import RlhfError

IM_START, IM_END, PAD = 257, 258, 259


def b(text: str) -> list[int]:
    """Byte ids of `text` (what the byte-level tokenizer gives for plain text)."""
    return list(text.encode())


def masked(ex: sd.Example) -> list[int]:
    return [t for t, m in zip(ex.ids, ex.mask, strict=True) if m]


# ---------------------------------------------------------------- rendering and masks


def test_chat_prompt_completion_mask_is_exactly_the_reply_and_im_end(tok) -> None:
    ex = sd.tokenize_row(tok, SftRow("prompt", prompt="hi", completion="yo", where="d.jsonl:1"), "chat")
    # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n
    prompt = [IM_START, *b("user\nhi"), IM_END, *b("\n"), IM_START, *b("assistant\n")]
    reply = [*b("yo"), IM_END]
    assert ex.ids == prompt + reply + b("\n")
    assert ex.mask == [0] * len(prompt) + [1, 1, 1] + [0]  # the trailing newline is formatting: 0
    assert ex.where == "d.jsonl:1"


def test_chat_multi_turn_masks_only_assistant_turns(tok) -> None:
    msgs = (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
    )
    ex = sd.tokenize_row(tok, SftRow("messages", messages=msgs), "chat")

    def turn(role: str, content: str) -> list[int]:
        return [IM_START, *b(f"{role}\n{content}"), IM_END, *b("\n")]

    head = [IM_START, *b("assistant\n")]
    expect_ids, expect_mask = [], []
    for m in msgs:
        t = turn(m["role"], m["content"])
        expect_ids += t
        if m["role"] == "assistant":
            # header 0, content + <|im_end|> 1, newline 0
            expect_mask += [0] * len(head) + [1] * (len(m["content"]) + 1) + [0]
        else:
            expect_mask += [0] * len(t)
    assert ex.ids == expect_ids
    assert ex.mask == expect_mask
    assert masked(ex) == [*b("2"), IM_END, *b("4"), IM_END]


def test_chat_opening_assistant_turn_does_not_train_its_header(tok) -> None:
    msgs = ({"role": "assistant", "content": "hey"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"})
    ex = sd.tokenize_row(tok, SftRow("messages", messages=msgs), "chat")
    assert masked(ex) == [*b("hey"), IM_END, *b("y"), IM_END]
    assert ex.mask[: len(b("assistant\n")) + 1] == [0] * (len(b("assistant\n")) + 1)


def test_chat_messages_format_ignores_fmt_raw(tok) -> None:
    # messages rows always go through the template (raw only changes prompt/completion rows)
    msgs = ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})
    assert sd.tokenize_row(tok, SftRow("messages", messages=msgs), "raw") == sd.tokenize_row(
        tok, SftRow("messages", messages=msgs), "chat"
    )


def test_raw_prompt_completion_mask(tok) -> None:
    ex = sd.tokenize_row(tok, SftRow("prompt", prompt="2+2=", completion="4"), "raw")
    # no BOS (the builtin tokenizer does not add one); prompt bytes 0, completion + EOS 1
    assert ex.ids == [*b("2+2="), *b("4"), IM_END]
    assert ex.mask == [0, 0, 0, 0, 1, 1]


def test_text_row_is_all_targets_plus_eos(tok) -> None:
    ex = sd.tokenize_row(tok, SftRow("text", text="abc"), "chat")
    assert ex.ids == [97, 98, 99, IM_END]
    assert ex.mask == [1, 1, 1, 1]


def test_non_prefix_chat_template_raises_with_row_location() -> None:
    from rlhf_cli.models.builtin import build_tokenizer

    tok = build_tokenizer()
    # a template that prints the number of turns first rewrites the start of every prefix
    tok.chat_template = (
        "{{- messages|length|string + '\\n' }}"
        "{%- for m in messages %}{{- m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
    )
    row = SftRow("prompt", prompt="hi", completion="yo", where="demos.jsonl:7")
    with pytest.raises(RlhfError, match=r"^demos\.jsonl:7: the chat template does not render turns as prefixes"):
        sd.tokenize_row(tok, row, "chat")
    # raw format does not use the template, so it still works
    assert masked(sd.tokenize_row(tok, row, "raw")) == [*b("yo"), IM_END]


# ---------------------------------------------------------------- truncation and dropping


def test_truncation_cuts_long_rows_and_warns(tok, capsys) -> None:
    rows = [SftRow("text", text="abcdefghij", where="t.jsonl:1"), SftRow("text", text="ab", where="t.jsonl:2")]
    out = sd.tokenize_rows(tok, rows, "chat", max_len=4)
    assert [e.ids for e in out] == [b("abcd"), [*b("ab"), IM_END]]
    assert [e.mask for e in out] == [[1, 1, 1, 1], [1, 1, 1]]
    err = capsys.readouterr().err
    assert "1 of 2 rows" in err and "truncated" in err


def test_rows_without_targets_after_truncation_are_dropped_loudly(tok, capsys) -> None:
    rows = [
        SftRow("prompt", prompt="a long prompt", completion="x", where="p.jsonl:1"),  # completion cut off
        SftRow("prompt", prompt="ab", completion="cd", where="p.jsonl:2"),
    ]
    out = sd.tokenize_rows(tok, rows, "raw", max_len=6)
    assert [e.where for e in out] == ["p.jsonl:2"]
    assert out[0].ids == [*b("abcd"), IM_END]
    err = capsys.readouterr().err
    assert "1 rows have no target token" in err and "DROPPED" in err and "p.jsonl:1" in err


def test_mask_only_on_first_token_counts_as_empty(tok, capsys) -> None:
    # a text row cut to 1 token keeps mask [1] on token 0, but nothing predicts token 0: no target
    rows = [SftRow("text", text="abc", where="e.jsonl:1")]
    with pytest.raises(RlhfError, match="no row has a target token left"):
        sd.tokenize_rows(tok, rows, "raw", max_len=1)
    assert "DROPPED" in capsys.readouterr().err


def test_all_rows_dropped_is_an_error(tok) -> None:
    rows = [SftRow("prompt", prompt="a long prompt", completion="x", where="only.jsonl:1")]
    with pytest.raises(RlhfError, match=r"^only\.jsonl: no row has a target token left"):
        sd.tokenize_rows(tok, rows, "raw", max_len=4)


# ---------------------------------------------------------------- packing and mixtures


def test_pack_best_fit_by_hand() -> None:
    # decreasing: 5 -> new row A (3 left); 4 -> new row B (4 left); 3 -> best fit A (0 left);
    # 3 -> B (1 left); 1 -> B (0 left)
    assert sd.pack_best_fit([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]


def test_pack_best_fit_edge_cases() -> None:
    assert sd.pack_best_fit([], 8) == []
    assert sd.pack_best_fit([8, 8], 8) == [[0], [1]]  # exactly full rows
    with pytest.raises(ValueError, match="length 9 cannot fit a row of 8"):
        sd.pack_best_fit([3, 9], 8)  # never silently over capacity


@pytest.mark.parametrize("seed", range(5))
def test_pack_best_fit_respects_capacity_and_places_each_index_once(seed: int) -> None:
    rng = random.Random(seed)
    cap = rng.randint(8, 64)
    lengths = [rng.randint(1, cap) for _ in range(rng.randint(1, 200))]
    rows = sd.pack_best_fit(lengths, cap)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= cap for r in rows)
    # best fit is never worse than 2x the lower bound on rows
    assert len(rows) <= 2 * -(-sum(lengths) // cap)


def _source(tag: str, n: int, weight: float) -> sd.Source:
    return sd.Source([sd.Example([i, i], [1, 1], f"{tag}:{i}") for i in range(n)], weight)


def test_epoch_examples_mixture_weights() -> None:
    half, twice, once = _source("half", 6, 0.5), _source("twice", 3, 2.0), _source("once", 4, 1.0)
    exs = sd.epoch_examples([half, twice, once], seed=0, epoch=0)
    by = {tag: sorted(e.where for e in exs if e.where.startswith(tag + ":")) for tag in ("half", "twice", "once")}
    assert len(by["half"]) == 3 and len(set(by["half"])) == 3  # round(0.5 * 6) distinct rows
    assert by["twice"] == sorted([f"twice:{i}" for i in range(3)] * 2)  # every row exactly twice
    assert by["once"] == [f"once:{i}" for i in range(4)]
    assert len(exs) == 3 + 6 + 4


def test_epoch_examples_fractional_weight_above_one() -> None:
    # 1.5 * 4 = 6: every row once, plus 2 distinct extra rows
    exs = sd.epoch_examples([_source("s", 4, 1.5)], seed=3, epoch=0)
    counts = sorted(sum(e.where == f"s:{i}" for e in exs) for i in range(4))
    assert counts == [1, 1, 2, 2]


def test_epoch_examples_deterministic_per_seed_and_epoch() -> None:
    srcs = [_source("a", 10, 0.5), _source("b", 10, 1.0)]

    def order(seed: int, epoch: int) -> list[str]:
        return [e.where for e in sd.epoch_examples(srcs, seed, epoch)]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(2, 0)  # 15 examples: a collision of orders is ~1/15!
    assert order(1, 0) != order(1, 1)


def test_plan_epoch_packed_rows_fit_and_cover_the_epoch() -> None:
    rng = random.Random(0)
    exs = [sd.Example([1] * n, [1] * n, f"x:{i}") for i, n in enumerate(rng.randint(2, 16) for _ in range(40))]
    plan = sd.plan_epoch([sd.Source(exs, 1.0)], seed=0, epoch=0, batch_size=3, max_len=16, packing=True)
    rows = [row for mb in plan for row in mb]
    assert all(len(mb) <= 3 for mb in plan)
    assert all(sum(len(e.ids) for e in row) <= 16 for row in rows)
    assert sorted(e.where for row in rows for e in row) == sorted(e.where for e in exs)
    unpacked = sd.plan_epoch([sd.Source(exs, 1.0)], seed=0, epoch=0, batch_size=3, max_len=16, packing=False)
    assert sum(len(mb) for mb in unpacked) == 40 and all(len(row) == 1 for mb in unpacked for row in mb)


# ---------------------------------------------------------------- collation


def test_collate_packed_rows() -> None:
    a = sd.Example([10, 11, 12], [0, 1, 1], "a")
    c = sd.Example([20, 21], [1, 1], "c")  # mask on its first token: no target there, nothing precedes it
    d = sd.Example([30, 31, 32, 33], [0, 0, 1, 1], "d")
    batch = sd.collate([[a, c], [d]], pad_id=PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: packing is by positions
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, PAD]]
    # positions restart at 0 for each example, and for the fill
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # labels: the token where its mask is 1 (except each example's first token), -100 elsewhere
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21], [-100, -100, 32, 33, -100]]
    assert sd.target_count([[a, c], [d]]) == 5
    assert sd.token_count([[a, c], [d]]) == 9


def test_collate_padded_rows_use_an_attention_mask() -> None:
    a = sd.Example([10, 11, 12], [0, 1, 1], "a")
    d = sd.Example([30, 31], [1, 1], "d")
    batch = sd.collate([[a], [d]], pad_id=PAD)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[10, 11, 12], [30, 31, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12], [-100, 31, -100]]


def test_target_count_equals_supervised_labels() -> None:
    # the loss is normalised by target_count: it must count exactly the labels shift_targets keeps
    rng = random.Random(1)
    exs = [
        sd.Example([rng.randrange(256) for _ in range(n)], [rng.randint(0, 1) for _ in range(n)], str(i))
        for i, n in enumerate(rng.randint(1, 9) for _ in range(12))
    ]
    mb = [exs[0:3], exs[3:4], exs[4:8], exs[8:12]]
    labels = sd.collate(mb, PAD)["labels"]
    assert int((labels[:, 1:] != -100).sum()) == sd.target_count(mb)


# ---------------------------------------------------------------- packing equivalence on a real model


@pytest.fixture(scope="module")
def micro_loss(tok):
    from rlhf_cli.models.builtin import build_model
    from rlhf_cli.training import CausalLMLoss

    model = build_model("micro", len(tok), tok, seed=0)
    return CausalLMLoss(model)


def _random_examples(n: int, seed: int) -> list[sd.Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        prompt = i % 3  # 0 (examples 0, 3, 6): mask on the first token too, the case that can leak
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        out.append(sd.Example(ids, [0] * prompt + [1] * (length - prompt), f"r:{i}"))
    return out


def _loss_and_grads(loss_mod, mbs: list[sd.Microbatch]) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in loss_mod.parameters() if p.requires_grad]
    total = sum(loss_mod(**sd.collate(mb, PAD)) for mb in mbs)
    grads = torch.autograd.grad(total, params)
    total = total.detach()
    return total.item(), list(grads)


def test_packed_loss_and_grads_equal_one_by_one(micro_loss) -> None:
    exs = _random_examples(7, seed=0)
    # two packed rows (3 and 4 examples) plus the fill of the shorter row, in one microbatch
    packed = [[exs[0:3], exs[3:7]]]
    one_by_one = [[[e]] for e in exs]
    padded = [[[e] for e in exs]]  # all 7 as separate right-padded rows
    loss_p, grads_p = _loss_and_grads(micro_loss, packed)
    loss_1, grads_1 = _loss_and_grads(micro_loss, one_by_one)
    loss_pad, grads_pad = _loss_and_grads(micro_loss, padded)

    assert loss_1 > 0
    assert loss_p == pytest.approx(loss_1, rel=1e-5)
    assert loss_pad == pytest.approx(loss_1, rel=1e-5)
    for gp, g1, gpad in zip(grads_p, grads_1, grads_pad, strict=True):
        torch.testing.assert_close(gp, g1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gpad, g1, rtol=1e-4, atol=1e-6)


def test_packing_without_restarting_positions_would_leak(micro_loss) -> None:
    # the control: the same packed row with plain 0..T-1 positions (one long sequence) is different,
    # so the equality above really comes from the block-diagonal mask built from position_ids
    exs = _random_examples(3, seed=1)
    batch = sd.collate([exs], PAD)
    with torch.no_grad():
        packed = micro_loss(**batch).item()
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        leaky = micro_loss(**batch).item()
        alone = sum(micro_loss(**sd.collate([[e]], PAD)).item() for e in exs)
    assert packed == pytest.approx(alone, rel=1e-5)
    # a random micro model attends almost uniformly, so the leak is small, yet 10x the tolerance above
    assert abs(leaky - alone) > 1e-4 * alone
