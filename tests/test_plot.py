"""`rlhf plot`: panels picked from what metrics.jsonl holds, moving-average smoothing, NaN skipped,
runs overlaid, a real PNG written atomically, and bad input as one line with exit 2 and no PNG.

Panels and curves are checked on the pure helpers and on the matplotlib Figure's line data, not on
pixels; the PNG itself is checked by its signature and IHDR size.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import run_cli, write_jsonl

from rlhf_cli.cli import main
from rlhf_cli.commands.plot import (
    Panel,
    Run,
    draw,
    legend_labels,
    moving_average,
    pick_panels,
    series,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `rlhf argv` in-process -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def ppo_rows(n: int = 12, shift: float = 0.0) -> list[dict]:
    """Rows with the metric names `rlhf ppo` logs (values made up, but distinct per key)."""
    return [
        {"step": s, "reward": s / 10 + shift, "reward_norm": s / 20, "kl": 0.01 * s, "kl_k3": 0.009 * s,
         "kl_coef": 0.05, "entropy": 2 - s / 20, "policy_loss": -0.01, "value_loss": 1 / s, "clipfrac": 0.1,
         "vf_clipfrac": 0.05, "approx_kl": 0.002, "response_length": 30 + s, "eos_share": 0.9,
         "tokens_per_s": 1000.0, "time_generate": 0.5, "lr": 1e-6}
        for s in range(1, n + 1)
    ]


def lines_of(fig, title: str) -> dict[str, tuple[list[float], list[float], float]]:
    """label -> (xdata, ydata, alpha) for every line in the panel titled `title` (twin axis included)."""
    host = next(a for a in fig.axes if a.get_title() == title)
    axes = host.get_shared_x_axes().get_siblings(host)  # the panel and its twinx axis
    return {
        ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()), ln.get_alpha() if ln.get_alpha() is not None else 1.0)
        for a in axes for ln in a.get_lines()
    }


# ---------------------------------------------------------------- help and imports


def test_help_shows_examples(capsys) -> None:
    code, out, _ = call(["plot", "--help"], capsys)
    assert code == 0
    for text in ("Examples", "rlhf plot ppo/metrics.jsonl -o curves.png", "--smooth", "--metric", "--x"):
        assert text in out


def test_help_imports_neither_matplotlib_nor_torch() -> None:
    code = (
        "import sys\n"
        "from rlhf_cli.cli import main\n"
        "for argv in (['--help'], ['plot', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'matplotlib'))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stderr


# ---------------------------------------------------------------- which panels


def test_ppo_panels() -> None:
    assert pick_panels(ppo_rows(2)) == [
        Panel("reward", ("reward",), ("reward_norm",)),
        Panel("KL", ("kl", "kl_k3"), ("kl_coef",)),
        Panel("loss", ("policy_loss",), ("value_loss",)),
        Panel("entropy", ("entropy",)),
        Panel("clipping", ("clipfrac", "vf_clipfrac"), ("approx_kl",)),
        Panel("response", ("response_length",), ("eos_share",)),
    ]


def test_ppo_panels_keep_only_what_the_file_has() -> None:
    rows = [{"step": 1, "reward": 1.0, "kl": 0.1, "policy_loss": 0.2, "value_loss": None}]
    # value_loss is null (a NaN written by orjson): not a metric this file holds
    assert pick_panels(rows) == [Panel("reward", ("reward",)), Panel("KL", ("kl",)), Panel("loss", ("policy_loss",))]
    # a panel whose left metrics are all absent moves its twin to the left
    assert pick_panels([{"step": 1, "kl_coef": 0.05}]) == [Panel("KL", ("kl_coef",))]


def test_sft_and_rm_panels() -> None:
    sft = [{"step": 1, "loss": 2.0, "lr": 1e-5, "grad_norm": 1.0, "tokens": 9, "tokens_per_s": 9.0, "epoch": 0.1},
           {"step": 2, "loss": 1.5, "lr": 1e-5, "eval_loss": 1.7}]
    assert pick_panels(sft) == [Panel("loss", ("loss", "eval_loss")), Panel("learning rate", ("lr",))]
    rm = [{"step": 1, "loss": 0.7, "accuracy": 0.5, "margin": 0.1, "lr": 1e-5, "pairs": 8},
          {"step": 2, "loss": 0.6, "accuracy": 0.6, "margin": 0.2, "eval_accuracy": 0.55}]
    assert pick_panels(rm) == [
        Panel("loss", ("loss",)), Panel("accuracy", ("accuracy", "eval_accuracy")), Panel("margin", ("margin",))
    ]


def test_unknown_file_gets_every_numeric_key_and_explicit_metrics_win() -> None:
    rows = [{"step": 1, "time": 0.5, "score": 3, "name": "a", "ok": True, "bad": None},
            {"step": 2, "time": 1.0, "score": 4, "extra": 7}]
    assert pick_panels(rows) == [Panel("time", ("time",)), Panel("score", ("score",)), Panel("extra", ("extra",))]
    assert pick_panels(rows, x="time") == [Panel("score", ("score",)), Panel("extra", ("extra",))]  # x is not a panel
    assert pick_panels(ppo_rows(2), metrics=("kl", "lr")) == [Panel("kl", ("kl",)), Panel("lr", ("lr",))]


# ---------------------------------------------------------------- curves: smoothing, NaN, overlay


def test_moving_average_by_hand() -> None:
    # window 3, trailing, fewer values at the start:
    # [1, (1+2)/2, (1+2+6)/3, (2+6+4)/3, (6+4+8)/3] = [1, 1.5, 3, 4, 6]
    assert moving_average([1, 2, 6, 4, 8], 3) == pytest.approx([1, 1.5, 3, 4, 6])
    assert moving_average([1, 2, 6], 1) == [1, 2, 6]
    assert moving_average([2, 4], 5) == pytest.approx([2, 3])  # window longer than the series: running mean


def test_smoothed_line_over_a_faint_raw_line() -> None:
    rows = [{"step": s, "loss": v} for s, v in zip([1, 2, 3, 4, 5], [1, 2, 6, 4, 8], strict=True)]
    fig = draw([Run("m.jsonl", rows)], [Panel("loss", ("loss",))], smooth=3)
    lines = lines_of(fig, "loss")
    assert set(lines) == {"_raw loss", "loss"}
    raw_x, raw_y, raw_alpha = lines["_raw loss"]
    assert (raw_x, raw_y, raw_alpha) == ([1, 2, 3, 4, 5], [1, 2, 6, 4, 8], 0.25)
    xs, ys, alpha = lines["loss"]
    assert ys == pytest.approx([1, 1.5, 3, 4, 6])  # see test_moving_average_by_hand
    assert xs == pytest.approx([1, 1.5, 2, 3, 4])  # steps averaged over the same window: no lag
    assert alpha == 1.0


def test_sparse_eval_series_is_not_smoothed() -> None:
    # eval_loss in 2 of 6 rows (every 3 steps): drawn as logged, while loss (6 of 6) is smoothed
    rows = [{"step": s, "loss": float(s), **({"eval_loss": 10.0 * s} if s % 3 == 0 else {})} for s in range(1, 7)]
    lines = lines_of(draw([Run("m", rows)], [Panel("loss", ("loss", "eval_loss"))], smooth=2), "loss")
    assert set(lines) == {"_raw loss", "loss", "eval_loss"}
    assert lines["eval_loss"][:2] == ([3, 6], [30, 60])
    assert lines["loss"][1] == pytest.approx([1, 1.5, 2.5, 3.5, 4.5, 5.5])  # (s-1+s)/2


NAN_ROWS = [
    '{"step": 1, "reward": 1.0}',
    '{"step": 2, "reward": null}',  # how orjson (our MetricsLog) writes NaN
    '{"step": 3, "reward": NaN}',  # how Python's json module writes it
    '{"step": 4, "reward": Infinity}',
    '{"step": 5, "reward": -Infinity}',
    '{"step": 6, "reward": "n/a"}',
    '{"step": 7}',
    '{"step": 8, "reward": true}',
    '{"step": 9, "reward": 3.5}',
]


def test_nan_inf_and_missing_values_are_skipped(tmp_path, capsys) -> None:
    rows = [{"step": 1, "reward": 1.0}] + [orjson.loads(r) for r in NAN_ROWS[1:2] + NAN_ROWS[5:]]
    rows += [{"step": 3, "reward": float("nan")}, {"step": 4, "reward": float("inf")}]
    assert series(rows, "reward") == ([1.0, 9.0], [1.0, 3.5])
    src = write_jsonl(tmp_path, "m.jsonl", NAN_ROWS)
    out = tmp_path / "c.png"
    code, stdout, err = call(["plot", str(src), "-o", str(out)], capsys)
    assert code == 0, err
    assert stdout == ""  # stdout is data; the summary goes to stderr
    assert f"plot: 1 panels (reward) from 9 rows in 1 file -> {out}" in err
    assert png_size(out) == (600, 350)  # one panel: 6 x 3.5 inches at 100 dpi


def test_ppo_file_to_png(tmp_path, capsys) -> None:
    src = write_jsonl(tmp_path, "metrics.jsonl", ppo_rows(12))
    out = tmp_path / "plots" / "curves.png"  # the parent directory is created
    code, _, err = call(["plot", str(src), "-o", str(out), "--smooth", "4"], capsys)
    assert code == 0, err
    assert "plot: 6 panels (reward, KL, loss, entropy, clipping, response) from 12 rows in 1 file" in err
    assert png_size(out) == (1200, 1050)  # 6 panels as 2 columns x 3 rows of 600 x 350 px
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left


def test_two_runs_overlaid(tmp_path, capsys) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = write_jsonl(tmp_path / "a", "metrics.jsonl", ppo_rows(5))
    b = write_jsonl(tmp_path / "b", "metrics.jsonl", ppo_rows(5, shift=1.0))
    assert legend_labels([str(a), str(b)]) == ["a/metrics.jsonl", "b/metrics.jsonl"]
    assert legend_labels(["x/m.jsonl", "-"]) == ["m.jsonl", "<stdin>"]
    runs = [Run("a/metrics.jsonl", ppo_rows(5)), Run("b/metrics.jsonl", ppo_rows(5, shift=1.0))]
    fig = draw(runs, [Panel("entropy", ("entropy",)), Panel("reward", ("reward",), ("reward_norm",))])
    assert set(lines_of(fig, "entropy")) == {"a/metrics.jsonl", "b/metrics.jsonl"}  # legend = file name
    reward = lines_of(fig, "reward")
    assert set(reward) == {"a/metrics.jsonl: reward", "b/metrics.jsonl: reward",
                           "a/metrics.jsonl: reward_norm", "b/metrics.jsonl: reward_norm"}
    assert reward["b/metrics.jsonl: reward"][1] == pytest.approx([1.1, 1.2, 1.3, 1.4, 1.5])  # s/10 + 1
    assert fig.get_suptitle() == "a/metrics.jsonl vs b/metrics.jsonl"

    out = tmp_path / "cmp.png"
    code, _, err = call(["plot", str(a), str(b), "-o", str(out), "-k", "reward,kl"], capsys)
    assert code == 0, err
    assert "plot: 2 panels (reward, kl) from 10 rows in 2 files" in err
    assert png_size(out) == (1200, 350)


def test_x_axis_from_another_key(tmp_path, capsys) -> None:
    rows = [{"step": s, "epoch": s / 4, "loss": 4 - s} for s in (1, 2, 3)]
    assert series(rows, "loss", x="epoch") == ([0.25, 0.5, 0.75], [3.0, 2.0, 1.0])
    src = write_jsonl(tmp_path, "m.jsonl", rows)
    code, _, err = call(["plot", str(src), "--x", "epoch", "-o", str(tmp_path / "e.png")], capsys)
    assert code == 0, err
    assert "plot: 1 panels (loss)" in err  # sft layout: loss (no eval_loss, no lr in this file)


def test_stdin_in_process(tmp_path, capsys, monkeypatch) -> None:
    data = b"".join(orjson.dumps(r) + b"\n" for r in ppo_rows(3))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    out = tmp_path / "s.png"
    code, _, err = call(["plot", "-", "-o", str(out)], capsys)
    assert code == 0, err
    assert "from 3 rows in 1 file" in err and png_size(out) == (1200, 1050)


def test_stdin_real_process(tmp_path) -> None:
    text = "".join(f'{{"step": {s}, "loss": {3 - s}, "lr": 0.001}}\n' for s in (1, 2))
    proc = run_cli(["plot", "-", "-o", str(tmp_path / "p.png")], input=text)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "plot: 2 panels (loss, learning rate) from 2 rows in 1 file" in proc.stderr
    assert png_size(tmp_path / "p.png") == (1200, 350)


# ---------------------------------------------------------------- bad input: one line, exit 2, no PNG

GOOD = [{"step": 1, "loss": 1.0}]
BAD = [
    # (rows of the second file, extra args, where, expected text)
    ([], [], "bad.jsonl:1:", "file is empty, expected metrics rows"),
    ([{"step": 1, "loss": 1.0}, "{oops"], [], "bad.jsonl:2:", "malformed JSON"),
    ([{"step": 1, "loss": 1.0}, "[1, 2]"], [], "bad.jsonl:2:", "expected a JSON object, got list"),
    ([{"step": 1, "loss": 1.0}, {"loss": 2.0}], [], "bad.jsonl:2:", "no 'step' field in this row"),
    ([{"step": "one", "loss": 1.0}], [], "bad.jsonl:1:", "'step' must be a finite number, got 'one'"),
    ([{"step": 1, "loss": 1.0}, {"step": 2, "epoch": None}], ["--x", "epoch"], "good.jsonl:1:", "no 'epoch' field"),
    ([{"step": 1, "loss": 1.0}], ["-k", "loss", "-k", "nope"], "", "metric 'nope' has no numeric value in good.jsonl, bad.jsonl"),
    ([{"step": 1, "loss": 1.0}], ["--smooth", "0"], "", "--smooth must be >= 1; got 0"),
]


@pytest.mark.parametrize(("rows", "extra", "where", "expected"), BAD)
def test_bad_input_one_line_exit_2_no_png(rows, extra, where, expected, tmp_path, capsys) -> None:
    good = write_jsonl(tmp_path, "good.jsonl", GOOD)
    bad = write_jsonl(tmp_path, "bad.jsonl", rows)
    code, out, err = call(["plot", str(good), str(bad), "-o", str(tmp_path / "c.png"), *extra], capsys)
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and where in errors[0] and expected in errors[0], err
    assert any(ln.startswith("hint:") for ln in err.splitlines()), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]  # no PNG, no temp file


def test_bad_paths_and_nothing_to_plot(tmp_path, capsys) -> None:
    only_step = write_jsonl(tmp_path, "s.jsonl", [{"step": 1}, {"step": 2, "note": "x"}])
    cases = [
        (["plot", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["plot", str(only_step), "-o", str(only_step)], "s.jsonl: is also an input"),
        (["plot", str(only_step), "-o", str(tmp_path)], "is a directory, expected a PNG path"),
        (["plot", "-", "-", "-o", str(tmp_path / "c.png")], "stdin ('-') given more than once"),
        (["plot", str(only_step), "-o", str(tmp_path / "c.png")], "no numeric metrics besides 'step' in s.jsonl"),
    ]
    for argv, expected in cases:
        code, out, err = call(argv, capsys)
        assert (code, out) == (2, ""), err
        assert err.startswith("error: ") and expected in err.splitlines()[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]
