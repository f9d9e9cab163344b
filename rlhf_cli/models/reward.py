"""Reward models: a transformer backbone plus a scalar head, read at each sequence's last real token.

    model = load_reward_model(parse_model_spec("sft/"), tok)      # SFT checkpoint, HF dir, .gguf, builtin:*
    r = sequence_rewards(model, input_ids, attention_mask)         # (N,) differentiable
    score(model, tok, ["What is 2+2?"], ["4"], batch_size=8, device="cpu")   # -> [1.73]

The model is an ordinary `AutoModelForSequenceClassification` with `num_labels=1` (Llama, Qwen,
Mistral, ...: `model.score` over the decoder's last hidden states), so a checkpoint written by
`rlhf train-rm` loads anywhere with `AutoModelForSequenceClassification.from_pretrained(dir)`.

Where the reward is read. transformers' own pooling takes the rightmost token that is not
`config.pad_token_id`. When pad == eos (SmolLM2, Llama 3, GPT-2, ...) and every sequence ends with
EOS, that is the token *before* EOS, and older code that took the first pad token read somewhere in
the prompt (ChatML closes every prompt turn with EOS), where chosen and rejected are identical: the
reward model then sits at loss log 2 = 0.693. We read the head at index `attention_mask.sum(1) - 1`
of right-padded rows, which is EOS whatever the pad id is; and the checkpoint's tokenizer gets a pad
token distinct from EOS (`ensure_distinct_pad`), so transformers' pooling reads the same token.

Encoders (BERT, RoBERTa, DeBERTa, ...: no `score` head) are bidirectional, so every position sees
the whole sequence and their pretrained pooling reads the *first* token: sequences are built as
`[CLS] prompt completion [SEP]` ([SEP] stands in for the EOS they lack, pref_data) and the reward
is the model's own head on the [CLS] state (BERT: `classifier(pooler(h[:, 0]))`). Training,
`score()` and plain `AutoModelForSequenceClassification.from_pretrained(dir)` then agree, and
right padding changes nothing. Their chat format is the ChatML default on plain text: use
`--format raw` (any [CLS] is still prepended).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_cli.console import warn
from rlhf_cli.errors import RlhfError


def ensure_distinct_pad(tok: Any) -> None:
    """Give a tokenizer whose pad token is EOS (or missing) another special token as padding.

    Our own batches never look at the pad id (rewards come from the attention mask); this only
    makes the saved checkpoint's tokenizer + config right for transformers' pad-matching pooling.
    """
    eos = tok.eos_token_id
    if tok.pad_token_id is not None and tok.pad_token_id != eos:
        return
    for token in (tok.unk_token, tok.bos_token, *getattr(tok, "all_special_tokens", [])):
        if token and tok.convert_tokens_to_ids(token) not in (None, eos):
            tok.pad_token = token
            return
    tok.pad_token = tok.eos_token
    warn("the tokenizer has no special token besides EOS to pad with: plain transformers will read this "
         "reward model one token early (rlhf's own scoring is unaffected)")


def load_reward_model(spec: Any, tok: Any, dtype: str = "fp32", trust_remote_code: bool = False) -> Any:
    """A sequence-classification model with one output, its backbone from `spec`, on the CPU.

    A directory or hub id loads with `from_pretrained(num_labels=1)` (a reward checkpoint keeps its
    head; a causal LM gets a fresh one). builtin:* and .gguf specs load as causal LMs first and
    their backbone weights are copied into a sequence-classification model of the same config.
    """
    from transformers import AutoModelForSequenceClassification

    from rlhf_cli.models.loading import hub_call, load_model

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    ensure_distinct_pad(tok)
    if spec.kind in ("builtin", "gguf"):
        causal = load_model(spec, tok, dtype, trust_remote_code)
        config = causal.config
        config.num_labels, config.architectures = 1, None
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch_dtype)
        getattr(model, model.base_model_prefix).load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
        fresh_head = True
    else:
        with warnings.catch_warnings(), _quiet_transformers():  # its report calls the fresh head "MISSING"
            warnings.simplefilter("ignore")
            model, loading = hub_call(
                AutoModelForSequenceClassification.from_pretrained, spec.value, spec, num_labels=1, dtype=torch_dtype,
                trust_remote_code=trust_remote_code, output_loading_info=True,
            )
        fresh_head = any(k.split(".")[0] in ("score", "classifier") for k in loading.get("missing_keys", ()))
    if model.config.num_labels != 1:
        raise RlhfError(f"{spec.raw}: a reward model needs one output, this one has {model.config.num_labels}")
    model.config.pad_token_id = tok.pad_token_id
    if fresh_head:
        init_score_head(model)
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def init_score_head(model: Any, seed: int = 0) -> None:
    """N(0, 1/(H+1)) head, as in Ziegler et al. 2019 (lm-human-preferences): the initial rewards are
    O(1) for unit-scale final hidden states, so the loss starts near log 2 and the head learns fast.
    A decoder's head is `score`, an encoder's a linear `classifier` (others keep their own init)."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(head.weight, std=1 / math.sqrt(head.weight.shape[1] + 1))
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def add_reward_lora(model: Any, r: int, alpha: float) -> Any:
    """LoRA on every linear layer of the backbone; the fresh score head is trained in full
    (peft's modules_to_save), since a low-rank update of a random head learns nothing useful."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; the scale alpha / r takes any float
                     lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["score"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, cfg)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) right-padded 0/1 mask -> (N,) index of each row's last real token (its EOS)."""
    return attention_mask.sum(1) - 1


def sequence_rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each right-padded row, read at its last real token.  (N, T), (N, T) -> (N,) fp32.

    The head runs on those N hidden states only (it is linear, so this equals transformers' head on
    all positions followed by the gather). Models without a `score` head (encoders: BERT-style pool
    their first token, [CLS]) use their own forward, exactly as plain transformers does.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "score", None)
    if head is None:
        return inner(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (N, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    h = hidden[rows, last_token_index(attention_mask)]  # (N, H)
    return head(h).squeeze(-1).float()


def token_values(model: Any, ids: torch.Tensor, mask: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Per-token value estimates V(s_t) of a decoder reward-model-shaped network.  -> (N, length) fp32.

    ids, mask: (N, P+G) left-padded prompt + right-padded response (PPO's layout), `start` = P. The
    value of response token t is the head on the state that produces it (position P - 1 + t), the same
    state the policy's log-prob of token t comes from. Position ids restart after the left padding.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "score", None)
    if head is None:
        raise RlhfError("a value model needs a decoder with a `score` head (encoders such as BERT cannot be one)",
                        "use --value-init policy")
    backbone = getattr(inner, inner.base_model_prefix)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    return head(hidden[:, start - 1 : start - 1 + length]).squeeze(-1).float()  # (N, length)


class RewardForward(nn.Module):
    """forward(input_ids, attention_mask) -> (N,) rewards, as one module so DDP sees every parameter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_rewards(self.model, input_ids, attention_mask)


@torch.no_grad()
def score(
    model: Any,
    tok: Any,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    completions: Sequence[str],
    batch_size: int = 8,
    device: str = "cpu",
    fmt: str = "chat",
    max_len: int | None = None,
) -> list[float]:
    """Reward of each (prompt, completion); a prompt is a string or a message list.

    Sequences are built exactly as `train-rm` builds them (pref_data: prompt + completion + EOS,
    prompt cut from the left past `max_len`) and batched by length to waste little on padding.
    """
    from rlhf_cli.data.pref_data import completion_ids, fit, prompt_ids

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    seqs = []
    for p, c in zip(prompts, completions, strict=True):
        text, msgs = (p, None) if isinstance(p, str) else (None, list(p))
        comp = completion_ids(tok, c)
        fitted = fit(prompt_ids(tok, text, msgs, fmt), comp, max_len)
        seqs.append(fitted[0] if fitted else comp[-max_len:] if max_len else comp)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in idx], device=device)
        mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in idx], device=device)
        for i, r in zip(idx, sequence_rewards(model, ids, mask).tolist(), strict=True):
            out[i] = r
    model.train(was_training)
    return out


def load_for_scoring(path: str, device: str = "cpu", dtype: str = "fp32", trust_remote_code: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, manifest) of a reward checkpoint directory, in eval mode on `device`."""
    from rlhf_cli.models.checkpoint import MANIFEST
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec, read_json_object

    spec = parse_model_spec(path)
    if spec.kind != "dir":
        raise RlhfError(f"{path}: a reward model must be a checkpoint directory", "train one with `rlhf train-rm`")
    manifest_path = Path(path) / MANIFEST
    manifest = read_json_object(manifest_path) if manifest_path.is_file() else {}
    archs = read_json_object(Path(path) / "config.json").get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise RlhfError(f"{path}: not a reward model (architectures {archs})", "train one with `rlhf train-rm`")
    tok = load_tokenizer(spec, trust_remote_code)
    model = load_reward_model(spec, tok, dtype, trust_remote_code).to(device).eval()
    return model, tok, manifest
