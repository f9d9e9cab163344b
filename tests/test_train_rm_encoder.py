"""`rlhf train-rm` from an encoder (issue 3: "from an SFT checkpoint or any causal LM (or encoder)").

A tiny BERT (hidden 32, 2 layers) is written to disk as a user's plain encoder checkpoint would be
(`BertModel` + `BertTokenizerFast`, like bert-base: no classification head, no EOS token, no chat
template), built here from a small WordPiece vocab: no download.
"""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
import torch
from conftest import write_jsonl
from sft_helpers import load_weights, manifest, metrics_rows
from test_train_rm import rm_config, sum_pairs

from rlhf_cli.commands.train_rm import run
from rlhf_cli.errors import RlhfError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["what", "is", "+", "?", "!", ".", ","]


def bert_dir(root: Path) -> Path:
    """A plain (headless) BERT encoder directory: vocab ids 0-4 are the specials, then words, digits, ##digits."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + WORDS + [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores vocab_file= (an empty vocab: all [UNK])
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    path = root / "tiny-bert"
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder_rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    rows = sum_pairs(12)
    data, held_out = write_jsonl(root, "prefs.jsonl", rows), write_jsonl(root, "held_out.jsonl", sum_pairs(4, seed=1))
    cfg = rm_config(data, root / "rm", model=str(bert_dir(root)), format="raw", max_steps=3, eval_data=str(held_out))
    return cfg, rows, run(cfg)


def test_sequences_are_cls_prompt_completion_sep_like_the_tokenizers_own(encoder_rm):
    from transformers import AutoTokenizer

    from rlhf_cli.data.pref_data import completion_ids, prompt_ids
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    cfg, _, _ = encoder_rm
    tok = AutoTokenizer.from_pretrained(cfg.model)
    assert tok.eos_token_id is None and (tok.cls_token_id, tok.sep_token_id) == (2, 3)
    seq = prompt_ids(tok, "What is 3+4?", None, "raw") + completion_ids(tok, "12")
    # [CLS] what is 3 + 4 ? 1 ##2 [SEP]: vocab ids 2, 5, 6, 15, 7, 16, 8, 13, 24, 3
    assert seq == [2, 5, 6, 15, 7, 16, 8, 13, 24, 3]
    assert seq == tok("What is 3+4? 12")["input_ids"]
    with pytest.raises(RlhfError, match="pass --format raw"):  # not a jinja traceback about 'eos_token'
        prompt_ids(load_tokenizer(parse_model_spec(cfg.model)), "What is 3+4?", None, "chat")


def test_default_chat_format_on_an_encoder_is_one_line_naming_the_fix(encoder_rm, tmp_path, capsys):
    from test_train_rm import call

    cfg, _, _ = encoder_rm
    code, out, err = call(["train-rm", cfg.data, "--model", cfg.model, "--out", str(tmp_path / "rm")], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "encoder" in err and "hint: pass --format raw" in err
    assert not (tmp_path / "rm").exists()


def test_encoder_rm_trains_every_parameter_and_saves_one_label(encoder_rm):
    from transformers import AutoTokenizer

    from rlhf_cli.models.loading import parse_model_spec
    from rlhf_cli.models.reward import load_reward_model

    cfg, _, final = encoder_rm
    model = load_reward_model(parse_model_spec(cfg.model), AutoTokenizer.from_pretrained(cfg.model))
    assert type(model).__name__ == "BertForSequenceClassification"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = load_weights(cfg.out)
    assert set(before) == set(after) and {"classifier.weight", "bert.pooler.dense.weight"} <= set(after)
    # the fresh head is N(0, 1/(32+1)) from a fixed seed (init_score_head), not the global RNG
    assert 0.05 < before["classifier.weight"].std().item() < 0.35
    # every weight moves; BERT's head has a bias (a decoder's `score` has none), and the pairwise loss
    # only sees r_chosen - r_rejected, so its gradient is exactly 0: it stays at its init, 0
    assert [n for n in before if torch.equal(before[n], after[n])] == ["classifier.bias"]
    assert after["classifier.bias"].tolist() == [0.0]
    assert all(torch.isfinite(t).all() for t in after.values())
    rows = metrics_rows(cfg.out)
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["pairs"] for r in rows] == [4, 4, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert math.isfinite(final["eval_loss"]) and final["reward_std"] > 0
    assert manifest(cfg.out)["step"] == "train-rm"
    config = orjson.loads((Path(cfg.out) / "config.json").read_bytes())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 1  # num_labels=1


def test_plain_transformers_reads_the_same_cls_reward_as_training_and_score(encoder_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.models.reward import load_for_scoring, score

    cfg, rows, final = encoder_rm
    hf = AutoModelForSequenceClassification.from_pretrained(cfg.out).eval()
    hf_tok = AutoTokenizer.from_pretrained(cfg.out)
    assert hf.config.num_labels == 1 and hf.config.architectures == ["BertForSequenceClassification"]
    prompts, answers = ["What is 1+2?", "What is 3+4?", "What is 0+0?"], ["3", "1234567", ""]
    enc = hf_tok([f"{p} {a}" for p, a in zip(prompts, answers, strict=True)], return_tensors="pt", padding=True)
    # [CLS] + 6 prompt pieces + answer pieces ("1234567": 1 ##2 .. ##7) + [SEP]; really padded, to 15
    assert enc["attention_mask"].sum(1).tolist() == [9, 15, 8]
    with torch.no_grad():
        plain = hf(**enc).logits.squeeze(-1).tolist()
        cls = hf.classifier(hf.bert.pooler(hf.bert(**enc).last_hidden_state)).squeeze(-1).tolist()  # pooler reads h[:, 0]
    model, tok, _ = load_for_scoring(cfg.out)
    ours = score(model, tok, prompts, answers, batch_size=2, fmt="raw")
    alone = [score(model, tok, [p], [a], fmt="raw")[0] for p, a in zip(prompts, answers, strict=True)]
    assert ours == pytest.approx(plain, abs=1e-5) and plain == pytest.approx(cls, abs=1e-6)
    assert ours == pytest.approx(alone, abs=1e-5)  # right padding does not move the [CLS] reward
    assert len(set(round(x, 4) for x in ours)) == 3
    # the training loop read the same rule: its reward stats are those of score() over every completion
    rewards = torch.tensor(score(model, tok, [r["prompt"] for r in rows] * 2,
                                 [r["chosen"] for r in rows] + [r["rejected"] for r in rows], fmt="raw"))
    assert final["reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-5)
    assert final["reward_std"] == pytest.approx(rewards.std(unbiased=False).item(), rel=1e-3)
