"""Unit tier: JSONL reading (errors name file:line) and the SFT / prompt record contract, ids."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import sys

import pytest
from conftest import write_jsonl

from rlhf_cli.data.jsonl import (
    Line,
    atomic_file,
    iter_jsonl,
    load_records,
    read_jsonl,
    truncate_partial_last_line,
    write_jsonl_atomic,
)
from rlhf_cli.data.records import assign_ids, content_id, parse_prompt_row, parse_sft_row
from rlhf_cli.errors import RlhfError

# ---------------------------------------------------------------- jsonl


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path) -> None:
    path = write_jsonl(tmp_path, "a.jsonl", [{"x": 1}, "", "   ", {"x": 2}])
    lines = read_jsonl(str(path))
    assert [(ln.data, ln.lineno) for ln in lines] == [({"x": 1}, 1), ({"x": 2}, 4)]
    assert lines[1].where == f"{path}:4"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"a": 1}, '{"a": 2'], r":2: malformed JSON"),
        ([{"a": 1}, "[1, 2]"], r":2: expected a JSON object, got list"),
        (['"just a string"'], r":1: expected a JSON object, got str"),
        ([{"a": 1}, {"a": 2}, "nul"], r":3: malformed JSON"),
        ([], r":1: file is empty, expected JSONL rows"),
        (["", "  "], r":1: file is empty, expected JSONL rows"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, rows, expected) -> None:
    path = write_jsonl(tmp_path, "bad.jsonl", rows)
    with pytest.raises(RlhfError) as e:
        read_jsonl(str(path))
    assert e.value.message.startswith(f"{path}:")
    assert re.search(expected, e.value.message)
    assert "\n" not in e.value.message


def test_read_jsonl_invalid_utf8_is_a_line_error(tmp_path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(RlhfError, match=r"latin1\.jsonl:2: malformed JSON"):
        read_jsonl(str(path))


def test_read_jsonl_missing_file_and_directory(tmp_path) -> None:
    with pytest.raises(RlhfError, match=r"nope\.jsonl: no such file") as e:
        read_jsonl(str(tmp_path / "nope.jsonl"))
    assert "'-'" in (e.value.hint or "")
    with pytest.raises(RlhfError, match="is a directory, expected a JSONL file"):
        read_jsonl(str(tmp_path))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_read_jsonl_unreadable_file(tmp_path) -> None:
    path = write_jsonl(tmp_path, "secret.jsonl", [{"a": 1}])
    path.chmod(0)
    try:
        with pytest.raises(RlhfError, match=r"secret\.jsonl: cannot read"):
            read_jsonl(str(path))
    finally:
        path.chmod(0o644)


def test_read_jsonl_stdin(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n\n{"a": [')))
    with pytest.raises(RlhfError, match=r"^<stdin>:3: malformed JSON"):
        read_jsonl("-")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n')))
    assert read_jsonl("-")[0].where == "<stdin>:1"


def test_nan_tokens_only_where_asked(tmp_path) -> None:
    """Python's json module writes NaN / Infinity; only a reader that opts in (`rlhf plot`) takes them."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": -Infinity}\n')
    with pytest.raises(RlhfError, match=r"m.jsonl:1: malformed JSON"):
        read_jsonl(str(path))
    rows = [line.data for line in iter_jsonl(str(path), nan_ok=True)]
    assert math.isnan(rows[0]["loss"]) and rows[1]["loss"] == -math.inf
    path.write_text('{"step": 1}\n{"step": oops}\n')
    with pytest.raises(RlhfError, match=r"m.jsonl:2: malformed JSON"):
        list(iter_jsonl(str(path), nan_ok=True))


def test_load_records_reads_a_json_array_with_line_numbers(tmp_path) -> None:
    path = tmp_path / "set.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,\n   "b": 3}\n]\n')
    assert [(ln.data, ln.lineno) for ln in load_records(str(path))] == [({"a": 1}, 2), ({"a": 2, "b": 3}, 3)]
    path.write_text('[{"a": 1}, 2]')
    with pytest.raises(RlhfError, match=r"set.json:1: expected a JSON object, got int"):
        load_records(str(path))
    jsonl = write_jsonl(tmp_path, "rows.jsonl", [{"a": 1}])
    assert load_records(str(jsonl))[0].data == {"a": 1}


def test_atomic_write_leaves_nothing_on_error(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError), atomic_file(out) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_jsonl_atomic(str(out), [{"a": 1}, {"b": "é"}])
    assert out.read_bytes() == b'{"a":1}\n{"b":"\xc3\xa9"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


def test_truncate_partial_last_line(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":')
    assert truncate_partial_last_line(path) == 5  # len('{"a":')
    assert path.read_bytes() == b'{"a":1}\n'
    assert truncate_partial_last_line(path) == 0


# ---------------------------------------------------------------- SFT rows


def _line(data, lineno: int = 3) -> Line:
    return Line(data, "d.jsonl", lineno)


def test_sft_row_shapes() -> None:
    r = parse_sft_row(_line({"prompt": "p", "completion": "c", "extra": 1}))
    assert (r.kind, r.prompt, r.completion, r.where) == ("prompt", "p", "c", "d.jsonl:3")
    r = parse_sft_row(_line({"messages": [{"role": "user", "content": "u", "name": "x"}, {"role": "assistant", "content": "a"}]}))
    assert r.kind == "messages"
    assert r.messages == ({"role": "user", "content": "u"}, {"role": "assistant", "content": "a"})
    r = parse_sft_row(_line({"text": "t"}))
    assert (r.kind, r.text) == ("text", "t")
    # an empty prompt is allowed (the completion is what is learned)
    assert parse_sft_row(_line({"prompt": "", "completion": "c"})).prompt == ""


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"prompt": "p"}, "d.jsonl:3: missing field 'completion', expected"),
        ({"completion": "c"}, "d.jsonl:3: missing field 'prompt', expected"),
        ({"prompt": 7, "completion": "c"}, "d.jsonl:3: field 'prompt' must be a string, got int"),
        ({"prompt": "p", "completion": None}, "d.jsonl:3: field 'completion' must be a string, got NoneType"),
        ({"prompt": "p", "completion": ""}, "d.jsonl:3: 'completion' is empty"),
        ({"messages": "hi"}, "d.jsonl:3: 'messages' must be a non-empty list"),
        ({"messages": []}, "d.jsonl:3: 'messages' must be a non-empty list"),
        ({"messages": [{"content": "x"}]}, 'd.jsonl:3: messages[0] must be {"role": str, "content": str}, got {"content":"x"}'),
        ({"messages": [{"role": "user", "content": "x"}, "no"]}, "d.jsonl:3: messages[1] must be"),
        ({"messages": [{"role": "user", "content": 5}]}, "d.jsonl:3: messages[0] must be"),
        ({"messages": [{"role": "user", "content": "x"}]}, "d.jsonl:3: 'messages' has no assistant turn"),
        ({"text": 1.5}, "d.jsonl:3: field 'text' must be a string, got float"),
        ({"text": ""}, "d.jsonl:3: 'text' is empty"),
        ({"question": "q"}, "d.jsonl:3: no 'prompt'/'completion', 'messages' or 'text' field, expected {\"prompt\""),
    ],
)
def test_sft_row_errors(data, expected: str) -> None:
    with pytest.raises(RlhfError) as e:
        parse_sft_row(_line(data))
    assert e.value.message.startswith(expected)


# ---------------------------------------------------------------- prompt rows and ids


def test_prompt_row_keeps_given_ids_and_the_whole_row() -> None:
    row = parse_prompt_row(_line({"id": "q1", "prompt": "p", "answer": 4}))
    assert (row.id, row.prompt, row.messages, row.extra) == ("q1", "p", None, {"id": "q1", "prompt": "p", "answer": 4})
    assert parse_prompt_row(_line({"id": 0, "messages": [{"role": "user", "content": "m"}]})).id == 0
    rows = assign_ids([parse_prompt_row(_line({"id": i, "prompt": "same"}, i)) for i in (5, 0, "0")])
    assert [r.id for r in rows] == [5, 0, "0"]  # 0 and "0" are different JSON values


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"id": True, "prompt": "p"}, "d.jsonl:3: field 'id' must be a string or integer, got bool"),
        ({"id": 1.5, "prompt": "p"}, "d.jsonl:3: field 'id' must be a string or integer, got float"),
        ({"id": None, "prompt": "p"}, "d.jsonl:3: field 'id' must be a string or integer, got NoneType"),
        ({"prompt": ["p"]}, "d.jsonl:3: field 'prompt' must be a string, got list"),
        ({"messages": {"role": "user"}}, "d.jsonl:3: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "d.jsonl:3: messages[0] must be"),
        ({"text": "t"}, "d.jsonl:3: no 'prompt' or 'messages' field, expected {\"prompt\": str}"),
    ],
)
def test_prompt_row_errors(data, expected: str) -> None:
    with pytest.raises(RlhfError) as e:
        parse_prompt_row(_line(data))
    assert e.value.message.startswith(expected)


def test_content_ids_are_stable_hashes() -> None:
    # sha256 of the JSON-encoded prompt, 12 hex digits: no Python hash(), so the same in every process
    (row,) = assign_ids([parse_prompt_row(_line({"prompt": "2+2="}))])
    assert row.id == hashlib.sha256(b'"2+2="').hexdigest()[:12]
    msgs = [{"role": "user", "content": "hi"}]
    (mrow,) = assign_ids([parse_prompt_row(_line({"messages": msgs}))])
    assert mrow.id == hashlib.sha256(b'[{"role":"user","content":"hi"}]').hexdigest()[:12]
    assert mrow.id == content_id(mrow)


def test_repeated_prompts_get_distinct_ids_in_file_order() -> None:
    lines = [_line({"prompt": "a"}, 1), _line({"prompt": "b"}, 2), _line({"prompt": "a"}, 3), _line({"prompt": "a"}, 4)]
    ids = [r.id for r in assign_ids([parse_prompt_row(ln) for ln in lines])]
    a = hashlib.sha256(b'"a"').hexdigest()[:12]
    assert ids == [a, hashlib.sha256(b'"b"').hexdigest()[:12], f"{a}-2", f"{a}-3"]
    # and again: the same file gives the same ids
    assert [r.id for r in assign_ids([parse_prompt_row(ln) for ln in lines])] == ids


def test_mixed_given_and_assigned_ids_stay_unique() -> None:
    a = hashlib.sha256(b'"a"').hexdigest()[:12]
    # a given id equal to a content hash: the assigned one moves aside
    rows = assign_ids([parse_prompt_row(_line({"id": a, "prompt": "x"}, 1)), parse_prompt_row(_line({"prompt": "a"}, 2))])
    assert [r.id for r in rows] == [a, f"{a}-2"]
    # the id-less row keeps the input row untouched (pass-through), the id is set on the record
    assert "id" not in rows[1].extra


def test_duplicate_given_ids_are_rejected() -> None:
    lines = [_line({"id": "q", "prompt": "a"}, 1), _line({"id": "r", "prompt": "b"}, 2), _line({"id": "q", "prompt": "c"}, 5)]
    with pytest.raises(RlhfError, match=r"^d\.jsonl:5: duplicate id 'q' \(first at d\.jsonl:1\)"):
        assign_ids([parse_prompt_row(ln) for ln in lines])


def test_assigned_id_never_collides_with_a_given_id(tmp_path):
    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.records import PromptRow, assign_ids, content_id, parse_prompt_row

    # the second row explicitly takes the id the first row's content hash would get
    probe = PromptRow("", "hello", None, {"prompt": "hello"})
    path = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hello"}, {"id": content_id(probe), "prompt": "other"}])
    rows = assign_ids([parse_prompt_row(line) for line in read_jsonl(str(path))])
    assert rows[1].id == content_id(probe)
    assert rows[0].id == content_id(probe) + "-2"


def test_atomic_files_get_the_mode_open_would_give(tmp_path) -> None:
    """Not mkstemp's private 0600: 0666 less the umask for a new file, an existing file's own mode kept."""
    import os

    old = os.umask(0o027)
    try:
        new = tmp_path / "new.jsonl"
        write_jsonl_atomic(str(new), [{"a": 1}])
        assert new.stat().st_mode & 0o777 == 0o640
        kept = tmp_path / "kept.jsonl"
        kept.write_bytes(b"")
        kept.chmod(0o604)
        write_jsonl_atomic(str(kept), [{"a": 1}])
        assert kept.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)
