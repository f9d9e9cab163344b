"""Every knob declared once: flags agree with the config dataclasses, and `--config FILE` works everywhere."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import orjson
import pytest
import typer
from conftest import write_jsonl

from rlhf_cli.cli import app, main
from rlhf_cli.config import build, check, coerce, flat, leaf_fields, read_config_file, update
from rlhf_cli.errors import RlhfError


def _configs() -> dict[str, type]:
    """Every command, as typed -> its config class."""
    from rlhf_cli.commands.dpo import DpoConfig
    from rlhf_cli.commands.grpo import GrpoConfig
    from rlhf_cli.commands.known import KnownConfig
    from rlhf_cli.commands.pairwise import PairwiseConfig
    from rlhf_cli.commands.plot import PlotConfig
    from rlhf_cli.commands.ppo import PpoConfig
    from rlhf_cli.commands.sample import SampleConfig
    from rlhf_cli.commands.select import SelectConfig
    from rlhf_cli.commands.sft import SftConfig
    from rlhf_cli.commands.train_rm import RmConfig
    from rlhf_cli.evals.code import CodeConfig
    from rlhf_cli.evals.exact import ExactConfig
    from rlhf_cli.evals.mc import McConfig
    from rlhf_cli.evals.ppl import PplConfig
    from rlhf_cli.evals.rm import RmEvalConfig
    from rlhf_cli.evals.winrate import WinrateConfig

    return {"sft": SftConfig, "train-rm": RmConfig, "ppo": PpoConfig, "sample": SampleConfig, "pairwise": PairwiseConfig,
            "plot": PlotConfig, "eval exact": ExactConfig, "eval rm": RmEvalConfig, "eval ppl": PplConfig, "eval mc": McConfig,
            "eval winrate": WinrateConfig, "eval code": CodeConfig, "dpo": DpoConfig, "grpo": GrpoConfig, "known": KnownConfig,
            "select": SelectConfig}


def test_every_command_is_covered():
    typed = {name for name, cmd in typer.main.get_command(app).commands.items() if not hasattr(cmd, "commands")}
    typed |= {f"eval {name}" for name in _click_command("eval").commands}
    assert typed == set(_configs())


def _click_command(path: str):
    cmd = typer.main.get_command(app)
    for part in path.split():
        cmd = cmd.commands[part]
    return cmd


def _nested(cls: type) -> dict[str, tuple[type, object]]:
    """The nested option dataclasses of a config: field name -> (class, the command's default instance)."""
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = (hints[f.name], f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
    return out


def _default(cls: type, name: str):
    owner = leaf_fields(cls)[name]
    if owner is not cls:  # a nested TrainOptions / JudgeOptions: the command's own defaults for it
        (holder,) = [default for sub, default in _nested(cls).values() if sub is owner]
        return getattr(holder, name)
    f = next(f for f in dataclasses.fields(owner) if f.name == name)
    return f.default


@pytest.mark.parametrize("path", sorted(_configs()))
def test_every_field_has_a_flag_with_the_same_default(path):
    cls = _configs()[path]
    params = {p.name: p for p in _click_command(path).params}
    config_only = getattr(cls, "CONFIG_ONLY", frozenset())
    for name in leaf_fields(cls):
        if name in config_only:
            assert name not in params, f"{path}: {name} is listed as config-file-only but has a flag"
            continue
        assert name in params, f"{path}: field {name} has no flag (add one, or list it in CONFIG_ONLY)"
        default = _default(cls, name)
        if default is dataclasses.MISSING:
            assert params[name].required, f"{path}: {name} has no default on the dataclass but is optional on the command line"
            continue
        shown = params[name].default
        shown = tuple(shown) if isinstance(shown, list) else shown
        assert shown == default or (shown is None and default == ()), f"{path}: --{name} defaults to {shown!r}, the field to {default!r}"
    extra = set(params) - set(leaf_fields(cls)) - {"config"} - set(getattr(cls, "CLI_ONLY", ()))
    assert {p for p in extra if not p.startswith("deprecated_")} == set(), f"{path}: flags without a field: {extra}"
    assert "config" in params, f"{path} has no --config"


@pytest.mark.parametrize("path", sorted(_configs()))
def test_a_config_key_spelled_as_a_field_means_that_field(path):
    """No flag of one field is spelled like another field (winrate's --reference is the outputs file,
    its rule field is --answer-field), so `flat(cfg)`, the manifest's config, reads back as itself."""
    from types import SimpleNamespace

    from rlhf_cli.config import _aliases

    cls = _configs()[path]
    aliases = _aliases(SimpleNamespace(command=_click_command(path)), cls)
    assert {n: aliases[n] for n in leaf_fields(cls)} == {n: n for n in leaf_fields(cls)}


def test_fields_are_unique_across_nested_options():
    for cls in _configs().values():
        names = [f.name for f in dataclasses.fields(cls) if f.name not in _nested(cls)]
        names += [g.name for sub, _ in _nested(cls).values() for g in dataclasses.fields(sub)]
        assert len(names) == len(set(names)), (cls, sorted(n for n in names if names.count(n) > 1))


def test_build_and_update_route_flat_values_to_the_owning_dataclass():
    from rlhf_cli.commands.sft import SftConfig

    cfg = build(SftConfig, data=("a.jsonl",), lr=1e-3, max_len=64)
    assert cfg.train.lr == 1e-3 and cfg.max_len == 64 and cfg.train.out == "sft"  # sft's own default out
    cfg2 = update(cfg, seed=3, packing=False)
    assert (cfg2.train.seed, cfg2.packing, cfg2.train.lr, cfg.train.seed) == (3, False, 1e-3, 0)
    with pytest.raises(TypeError, match="no field"):
        update(cfg, learning_rate=1)
    assert flat(cfg2)["seed"] == 3 and "train" not in flat(cfg2)


def test_ranges_name_the_flag():
    from rlhf_cli.commands.ppo import PpoConfig

    with pytest.raises(RlhfError, match=r"--lr must be > 0; got -1"):
        check(build(PpoConfig, prompts="p", lr=-1.0))
    with pytest.raises(RlhfError, match=r"--kl-estimator must be one of k1, k3"):
        check(build(PpoConfig, prompts="p", kl_estimator="k2"))
    with pytest.raises(RlhfError, match=r"--lora must be >= 0"):
        check(build(PpoConfig, prompts="p", lora_r=-2))
    with pytest.raises(RlhfError, match=r"--gamma must be in \[0, 1\]"):
        check(build(PpoConfig, prompts="p", gamma=1.5))
    with pytest.raises(RlhfError, match=r"finite"):
        check(build(PpoConfig, prompts="p", clip=float("nan")))
    check(build(PpoConfig, prompts="p", gamma=1.0, kl_target=None))  # edges and None pass


def test_coerce_types():
    assert coerce(1, float) == 1.0 and isinstance(coerce(1, float), float)
    assert coerce("1e-5", float) == 1e-5  # YAML 1.1 reads 1e-5 as a string
    assert coerce(None, int | None) is None and coerce(3, int | None) == 3
    assert coerce(["a", "b"], tuple[str, ...]) == ("a", "b") and coerce("a", tuple[str, ...]) == ("a",)
    for value, hint in ((True, int), ("x", float), (1, bool), (2.5, int), (3, str), ({"a": 1}, tuple[str, ...])):
        with pytest.raises(TypeError):
            coerce(value, hint)


def test_config_file_keys_as_flags_or_fields(tmp_path):
    from rlhf_cli.commands.ppo import PpoConfig

    f = tmp_path / "ppo.yaml"
    f.write_text("kl-horizon: 5000\nclip_value: 0.3\nlora: 8\nlr: 1e-5\nref: null\n")
    got = read_config_file(str(f), PpoConfig, {**{n: n for n in leaf_fields(PpoConfig)}, "lora": "lora_r"})
    assert {k: v for k, (_, v) in got.items()} == {"kl-horizon": 5000, "clip_value": 0.3, "lora": 8, "lr": 1e-5, "ref": None}
    assert got["lora"][0] == "lora_r"


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ("kl_horizn: 3\n", ".yaml", r"ppo\.yaml: unknown key 'kl_horizn'.*did you mean 'kl-horizon'"),
    ("kl-horizon: many\n", ".yaml", r"ppo\.yaml: key 'kl-horizon': expected a whole number, got 'many'"),
    ("lr: -0.5\n", ".yaml", r"ppo\.yaml: key 'lr' must be > 0; got -0.5"),
    ("- lr\n", ".yaml", r"expected a mapping"),
    ("lr: [1\n", ".yaml", r"not valid YAML"),
    ('{"lr": 1e-5,}', ".json", r"not valid JSON"),
])
def test_bad_config_files_exit_2_naming_file_and_key(tmp_path, capsys, text, suffix, message):
    import re

    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "a", "answer": "1"}] * 4)
    f = tmp_path / f"ppo{suffix}"
    f.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["ppo", str(prompts), "-m", "builtin:micro", "--judge", "rule:exact", "--out", str(tmp_path / "ppo"), "--config", str(f)])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and re.search(message, err), err
    assert not (tmp_path / "ppo").exists() and not (tmp_path / "ppo-state").exists()


def test_config_file_fills_the_run_and_the_command_line_wins(tmp_path, capsys):
    """sft from a YAML file: its values reach the run and the manifest, a flag beats the file."""
    data = write_jsonl(tmp_path, "d.jsonl", [{"prompt": f"{i}+1", "completion": str(i + 1)} for i in range(16)])
    (tmp_path / "sft.yaml").write_text(
        f"data: [{data}]\nmodel: builtin:micro\nmax-len: 32\nbatch_size: 4\nmax-steps: 2\nlr: 0.01\n"
        "schedule: wsd\ndecay-frac: 0.5\nmin-lr-ratio: 0.1\nsave-every: 0\ndevice: cpu\nseed: 7\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["sft", "--config", str(tmp_path / "sft.yaml"), "--lr", "0.02", "--out", str(tmp_path / "sft")])
    assert e.value.code in (0, None), capsys.readouterr().err
    m = orjson.loads((tmp_path / "sft" / "rlhf.json").read_bytes())
    assert m["config"]["lr"] == 0.02  # the command line wins
    assert (m["config"]["seed"], m["config"]["max_len"], m["config"]["decay_frac"], m["config"]["min_lr_ratio"]) == (7, 32, 0.5, 0.1)
    assert m["config"]["data"] == [str(data)]
    lrs = [orjson.loads(x)["lr"] for x in (tmp_path / "sft" / "metrics.jsonl").read_bytes().splitlines()]
    assert lrs == pytest.approx([0.02, 0.002])  # wsd: the last step decays to lr * min_lr_ratio

    # the manifest's config is itself a valid --config file for the same command
    (tmp_path / "again.json").write_bytes(orjson.dumps({k: v for k, v in m["config"].items() if k != "out"}))
    with pytest.raises(SystemExit) as e:
        main(["sft", "--config", str(tmp_path / "again.json"), "--out", str(tmp_path / "sft2")])
    assert e.value.code in (0, None)
    m2 = orjson.loads((tmp_path / "sft2" / "rlhf.json").read_bytes())
    assert {k: v for k, v in m2["config"].items() if k != "out"} == {k: v for k, v in m["config"].items() if k != "out"}


def test_ppo_knobs_only_a_config_file_reached_before_now_reach_the_run(tmp_path, capsys):
    """ref, max_prompt_len, kl_horizon, clip_value, max_grad_norm, lora_alpha, min_lr_ratio: all settable."""
    from rlhf_cli.commands.ppo import PpoConfig

    f = tmp_path / "ppo.yaml"
    f.write_text("ref: builtin:micro\nmax-prompt-len: 16\nkl-horizon: 50\nclip-value: 0.5\nmax-grad-norm: 0.5\n"
                 "lora-alpha: 8\nmin-lr-ratio: 0.5\nschedule: linear\n")
    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg

    import rlhf_cli.commands.ppo as ppo_mod

    mp = pytest.MonkeyPatch()
    mp.setattr(ppo_mod, "run", fake_run)
    try:
        with pytest.raises(SystemExit) as e:
            main(["ppo", "p.jsonl", "--judge", "rule:exact", "--config", str(f), "--kl-horizon", "70"])
        assert e.value.code in (0, None), capsys.readouterr().err
    finally:
        mp.undo()
    cfg: PpoConfig = seen["cfg"]
    assert (cfg.ref, cfg.max_prompt_len, cfg.kl_horizon, cfg.clip_value) == ("builtin:micro", 16, 70, 0.5)
    assert (cfg.train.max_grad_norm, cfg.train.lora_alpha, cfg.train.min_lr_ratio, cfg.train.schedule) == (0.5, 8.0, 0.5, "linear")


@pytest.mark.parametrize("argv", [["sft", "d.jsonl"], ["train-rm", "d.jsonl"], ["ppo", "p.jsonl", "--judge", "rule:exact"]])
@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--lr", "-1", "--lr must be > 0"), ("--warmup", "-2", "--warmup must be >= 0"), ("--epochs", "0", "--epochs must be >= 1"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0"), ("--schedule", "cosin", "--schedule must be one of"),
    ("--dtype", "fp16", "--dtype must be one of fp32, bf16"),
])
def test_numeric_options_are_range_checked_before_anything_loads(tmp_path, capsys, monkeypatch, argv, flag, value, message):
    monkeypatch.chdir(tmp_path)  # the data files do not even exist: the check comes first
    with pytest.raises(SystemExit) as e:
        main([*argv, flag, value, "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert not Path(tmp_path / "out").exists()


def test_deprecated_o_for_out_still_works_with_a_warning(tmp_path, capsys):
    data = write_jsonl(tmp_path, "d.jsonl", [{"prompt": f"{i}+1", "completion": str(i + 1)} for i in range(8)])
    with pytest.raises(SystemExit) as e:
        main(["sft", str(data), "-m", "builtin:micro", "--max-len", "32", "-b", "4", "--max-steps", "1", "--device", "cpu",
              "-o", str(tmp_path / "old")])
    err = capsys.readouterr().err
    assert e.value.code in (0, None), err
    assert "-o is deprecated" in " ".join(err.split()) and (tmp_path / "old" / "rlhf.json").is_file()


def _run_seen(monkeypatch, module: str, argv: list[str], capsys, returns=None):
    """Run `rlhf argv` with `module.run` replaced by a recorder; -> the config the command built."""
    import importlib

    seen = {}

    def fake_run(cfg, *a, **k):
        seen["cfg"] = cfg
        return returns

    monkeypatch.setattr(importlib.import_module(module), "run", fake_run)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None), capsys.readouterr().err
    return seen["cfg"]


def test_sample_config_file_reaches_the_run_and_a_flag_beats_it(tmp_path, capsys, monkeypatch):
    f = tmp_path / "sample.yaml"
    f.write_text("model: builtin:micro\nn: 4\ntemperature: 0.7\ntop-p: 0.9\nstop: ['###', END]\nformat: raw\n"
                 "output: out.jsonl\nresume: true\nmax_new_tokens: 12\n")
    cfg = _run_seen(monkeypatch, "rlhf_cli.commands.sample", ["sample", "p.jsonl", "--config", str(f), "-t", "0.5"], capsys)
    assert (cfg.model, cfg.n, cfg.temperature, cfg.top_p, cfg.stop, cfg.format) == ("builtin:micro", 4, 0.5, 0.9, ("###", "END"), "raw")
    assert (cfg.output, cfg.resume, cfg.max_new_tokens, cfg.prompts) == ("out.jsonl", True, 12, "p.jsonl")
    cfg = _run_seen(monkeypatch, "rlhf_cli.commands.sample", ["sample", "p.jsonl", "--config", str(f), "--stop", "X", "-o", "b.jsonl"], capsys)
    assert (cfg.stop, cfg.output, cfg.temperature) == (("X",), "b.jsonl", 0.7)  # a repeatable flag replaces the file's list


def test_pairwise_config_file_reaches_the_judge_options_and_a_flag_beats_it(tmp_path, capsys, monkeypatch):
    f = tmp_path / "judge.yaml"
    f.write_text("judge: api:gpt-4o-mini\nbase-url: http://127.0.0.1:9/v1\nprices: '1,2'\nconcurrency: 8\nreference: gold\n"
                 "seed: 3\nmax-retries: 2\ntimeout: 5\nresamples: 50\nboth_orders: false\n")
    cfg = _run_seen(monkeypatch, "rlhf_cli.commands.pairwise", ["pairwise", "s.jsonl", "--config", str(f), "--concurrency", "2",
                                                                 "-o", "pairs.jsonl", "--resume"], capsys, returns={"stopped": None})
    o = cfg.judge_options
    assert (cfg.judge, cfg.output, cfg.resume, cfg.both_orders, cfg.resamples, cfg.seed) == ("api:gpt-4o-mini", "pairs.jsonl", True, False, 50, 3)
    assert (o.base_url, o.prices, o.concurrency, o.reference_field, o.seed, o.max_retries, o.timeout) == (
        "http://127.0.0.1:9/v1", "1,2", 2, "gold", 3, 2, 5.0)


def test_eval_exact_config_file_reaches_the_run_and_a_flag_beats_it(tmp_path, capsys, monkeypatch):
    f = tmp_path / "gsm8k.yaml"
    f.write_text("model: [base/, sft/]\nshots: 2\nfewshot: train.jsonl\nquestion-template: 'Q: {question}'\n"
                 "field: [question=problem]\nn: 4\ntemperature: 0.7\nextract: strict\n")
    cfg = _run_seen(monkeypatch, "rlhf_cli.evals.exact", ["eval", "exact", "d.jsonl", "--config", str(f), "-m", "ppo/", "-n", "8"], capsys)
    assert (cfg.models, cfg.shots, cfg.fewshot, cfg.question_template, cfg.fields) == (("ppo/",), 2, "train.jsonl", "Q: {question}", ("question=problem",))
    assert (cfg.n, cfg.temperature, cfg.extract, cfg.data) == (8, 0.7, "strict", "d.jsonl")
    cfg = _run_seen(monkeypatch, "rlhf_cli.evals.exact", ["eval", "exact", "d.jsonl", "--config", str(f)], capsys)
    assert cfg.models == ("base/", "sft/")


@pytest.mark.parametrize(("argv", "text", "message"), [
    (["sample", "p.jsonl"], "top-p: 2\n", "key 'top-p' must be in (0, 1]; got 2.0"),
    (["pairwise", "s.jsonl", "--judge", "rule:exact"], "flip-prob: 1.5\n", "key 'flip-prob' must be in [0, 1]"),
    (["pairwise", "s.jsonl", "--judge", "api:m"], "timeout: 0\n", "key 'timeout' must be > 0"),
    (["plot", "m.jsonl"], "smooth: 0\n", "key 'smooth' must be >= 1"),
    (["eval", "exact", "d.jsonl", "-m", "x/"], "n: 0\n", "key 'n' must be >= 1"),
    (["eval", "rm", "d.jsonl", "-m", "x/"], "batch-size: 0\n", "key 'batch-size' must be >= 1"),
    (["eval", "ppl", "d.jsonl", "-m", "x/"], "max-len: 1\n", "key 'max-len' must be >= 2"),
    (["eval", "mc", "d.jsonl", "-m", "x/"], "scoring: letters\n", "key 'scoring' must be one of letter, cloze"),
    (["eval", "winrate", "o.json", "-r", "r.json", "--judge", "api:m"], "concurrency: 0\n", "key 'concurrency' must be >= 1"),
    (["eval", "code", "p.jsonl", "--canonical", "--allow-code-exec"], "memory-mb: 10\n", "key 'memory-mb' must be >= 64"),
    (["eval", "exact", "d.jsonl"], "template: 'Q {question}'\n", "unknown key 'template'"),  # config files start with the new names
])
def test_every_command_range_checks_its_config_file_before_reading_input(tmp_path, capsys, monkeypatch, argv, text, message):
    monkeypatch.chdir(tmp_path)  # the input files do not exist: the file's values are checked first
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--config", "c.yaml"])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and f"c.yaml: {message}" in err and "Traceback" not in err, err
