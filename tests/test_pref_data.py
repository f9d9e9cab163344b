"""Unit tier: preference rows (data/pref_data.py): every layout train-rm reads, bad rows naming
file:line, token sequences that end in EOS, left truncation of prompts, and batch collation.

The builtin tokenizer is byte-level: "4" is id 52, "5" is 53, 257 <|im_start|>, 258 <|im_end|> (EOS).
"""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from rlhf_cli.data.jsonl import Line, read_jsonl
from rlhf_cli.data.pref_data import PrefRow, collate, parse_pref_row, tokenize_prefs
from rlhf_cli.errors import RlhfError

EOS = 258


def parse(row: dict) -> PrefRow:
    return parse_pref_row(Line(row, "prefs.jsonl", 7))


def chat_prompt(text: str) -> list[int]:
    return [257, *b"user\n", *text.encode(), 258, 10, 257, *b"assistant\n"]


# ---------------------------------------------------------------- layouts


def test_pair_row_with_margin():
    row = parse({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "margin": 2, "judge": {"kind": "rule"}})
    assert (row.groups, row.prompt, row.messages, row.margin, row.raw, row.layout) == ((("4",), ("5",)), "What is 2+2?", None, 2.0, False, "pair")
    assert row.where == "prefs.jsonl:7"
    assert parse({"prompt": "p", "chosen": "a", "rejected": "b"}).margin is None


def test_pair_row_with_messages_and_trl_conversational_form():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    row = parse({"messages": msgs, "chosen": "4", "rejected": "5"})
    assert row.messages == tuple(msgs) and row.prompt is None
    # TRL explicit-prompt conversational: prompt is a message list, answers are one assistant message each
    trl = parse({"prompt": msgs, "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]})
    assert trl.messages == tuple(msgs) and trl.groups == (("4",), ("5",))


def test_ranking_rows_groups_and_flat():
    row = parse({"prompt": "p", "ranking": [["best"], ["tie a", "tie b"], ["worst"]]})
    assert row.groups == (("best",), ("tie a", "tie b"), ("worst",)) and row.layout == "ranking"
    assert parse({"prompt": "p", "ranking": ["a", "b", "c"]}).groups == (("a",), ("b",), ("c",))


def test_hh_rlhf_transcripts_split_at_the_last_assistant_marker():
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
    row = parse({"chosen": shared + " I think 4.", "rejected": shared + " I think 5."})
    # the common prefix runs on into " I think ", but the prompt stops at the marker
    assert row.prompt == shared and row.groups == ((" I think 4.",), (" I think 5.",))
    assert (row.raw, row.layout) == (True, "transcript")


def test_trl_implicit_prompt_strings_and_messages():
    row = parse({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert (row.prompt, row.groups, row.layout, row.raw) == ("The sky is", ((" blue.",), (" green.",)), "implicit", True)
    user = {"role": "user", "content": "2+2?"}
    conv = parse({"chosen": [user, {"role": "assistant", "content": "4"}], "rejected": [user, {"role": "assistant", "content": "5"}]})
    assert (conv.messages, conv.groups, conv.raw) == ((user,), (("4",), ("5",)), False)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "prefs.jsonl:7: missing field 'rejected'"),
        ({"prompt": "p"}, "prefs.jsonl:7: no 'chosen'/'rejected' or 'ranking' field"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number, got 'big'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, "'margin' must be a finite number"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string or a message list, got int"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "field 'chosen' must be a string or one assistant message"),
        ({"chosen": [{"role": "user"}], "rejected": []}, "'chosen' must be a non-empty list of {\"role\": str, \"content\": str} messages (item 0 is not)"),
        ({"chosen": "a", "rejected": ["b"]}, "must both be strings or both be message lists, got str and list"),
        ({"prompt": "p", "ranking": [["only", "tied"]]}, "'ranking' has a single group"),
        ({"prompt": "p", "ranking": [["a"], "b"]}, "'ranking' must be a list of strings or a list of non-empty string lists"),
        ({"ranking": ["a", "b"]}, "field 'prompt' must be a string or a message list, got NoneType"),
        ({"prompt": "p", "ranking": ["a", "b"], "chosen": "a"}, "both 'ranking' and 'chosen'/'rejected'"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "must share the dialogue"),
        ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
          "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "must share their opening messages"),
    ],
)
def test_bad_rows_name_file_and_line(row, message):
    with pytest.raises(RlhfError) as e:
        parse(row)
    assert message in e.value.message
    assert e.value.message.startswith("prefs.jsonl:7: ")


def test_errors_point_at_the_line_in_a_real_file(tmp_path):
    path = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, "", {"prompt": "p", "chosen": "a"}])
    with pytest.raises(RlhfError, match=r"p\.jsonl:3: missing field 'rejected'"):
        [parse_pref_row(line) for line in read_jsonl(str(path))]


# ---------------------------------------------------------------- tokenization


def test_chat_pair_tokens_end_in_eos(tok):
    (ex,) = tokenize_prefs(tok, [parse({"prompt": "What is 2+2?", "chosen": "4", "rejected": "15"})], "chat", 256)
    p = chat_prompt("What is 2+2?")  # what `rlhf sample` feeds the policy
    assert ex.seqs == [p + [52, EOS], p + [49, 53, EOS]]
    assert (ex.ranks, ex.margin) == ([0, 1], 0.0)


def test_raw_and_transcript_rows_skip_the_chat_template(tok):
    rows = [parse({"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.5}),
            parse({"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"})]
    raw_pair, hh = tokenize_prefs(tok, rows, "raw", 256)
    assert raw_pair.seqs == [[*b"2+2=4", EOS], [*b"2+2=5", EOS]] and raw_pair.margin == 1.5
    # a transcript row is plain text even under --format chat
    (hh_chat,) = tokenize_prefs(tok, rows[1:], "chat", 256)
    assert hh.seqs == hh_chat.seqs == [[*b"\n\nHuman: 2+2?\n\nAssistant: 4", EOS], [*b"\n\nHuman: 2+2?\n\nAssistant: 5", EOS]]


def test_a_completion_that_already_ends_in_eos_gets_no_second_one(tok):
    (ex,) = tokenize_prefs(tok, [parse({"prompt": "q", "chosen": "4<|im_end|>", "rejected": "5"})], "raw", 64)
    assert ex.seqs == [[113, 52, EOS], [113, 53, EOS]]


def test_ranking_ranks_follow_groups(tok):
    (ex,) = tokenize_prefs(tok, [parse({"prompt": "q", "ranking": [["a"], ["b", "c"], ["d"]]})], "raw", 64)
    assert ex.ranks == [0, 1, 1, 2]
    assert [s[1] for s in ex.seqs] == [97, 98, 99, 100]


def test_long_prompts_are_cut_from_the_left_and_unfit_rows_dropped_loudly(tok, capsys):
    rows = [
        parse({"prompt": "0123456789", "chosen": "ab", "rejected": "c"}),  # 10 + 3 > 8: prompt keeps its last 5 / 6
        parse({"prompt": "xy", "chosen": "a", "rejected": "b"}),  # fits
        parse_pref_row(Line({"prompt": "q", "chosen": "abcdefgh", "rejected": "b"}, "p.jsonl", 3)),  # 9 tokens: cannot fit
    ]
    out = tokenize_prefs(tok, rows, "raw", 8)
    assert out[0].seqs == [[*b"56789ab", EOS], [*b"456789c", EOS]]
    assert out[1].seqs == [[*b"xya", EOS], [*b"xyb", EOS]]
    assert len(out) == 2
    err = capsys.readouterr().err
    assert "1 of 3 rows were longer than --max-len 8: their prompts were truncated from the left" in err
    assert "1 rows have a completion that cannot fit --max-len 8 and were DROPPED (first: p.jsonl:3)" in err


def test_identical_pairs_and_ties_are_skipped_and_nothing_left_is_an_error(tok, capsys):
    same = parse({"prompt": "q", "chosen": "a", "rejected": "a"})
    tie = parse({"prompt": "q", "chosen": "a", "rejected": "b", "tie": True})
    assert tie.groups == (("a", "b"),)
    with pytest.raises(RlhfError, match="prefs.jsonl: no preference row is left to train on"):
        tokenize_prefs(tok, [same, tie], "raw", 64)
    err = capsys.readouterr().err
    assert "1 rows have identical chosen and rejected and were DROPPED" in err and "1 tie rows" in err


# ---------------------------------------------------------------- collation


def test_collate_pairs_and_rankings_in_one_batch(tok):
    rows = [parse({"prompt": "q", "chosen": "aa", "rejected": "b", "margin": 0.5}),
            parse({"prompt": "q", "ranking": [["c"], ["d", "e"], ["f"]]})]
    b = collate(tokenize_prefs(tok, rows, "raw", 64), pad_id=259)
    assert b["input_ids"].tolist()[:2] == [[113, 97, 97, EOS], [113, 98, EOS, 259]]
    assert b["attention_mask"].sum(1).tolist() == [4, 3, 3, 3, 3, 3]
    # pair row: (0 over 1); ranking row (sequences 2..5, ranks 0,1,1,2): 5 strict pairs, the tie skipped
    assert list(zip(b["better"].tolist(), b["worse"].tolist(), strict=True)) == [(0, 1), (2, 3), (2, 4), (2, 5), (3, 5), (4, 5)]
    assert b["row"].tolist() == [0, 1, 1, 1, 1, 1]
    assert b["margin"].tolist() == [0.5, 0, 0, 0, 0, 0]
    assert collate(tokenize_prefs(tok, rows, "raw", 64), 259, use_margin=False)["margin"].tolist() == [0.0] * 6
    assert b["n_rows"] == 2
