"""`--judge lm:MODEL`: a local causal LM answers "which output is better, a or b?", and we read its
answer from the next-token distribution, not from generated text.

For each ask the pairwise template (template.py) is rendered through the model's chat template with
the generation prompt, so the next token is the first token of the assistant's reply. From the
logits z at that position:

    z_A = logsumexp(z[t] for t in the "a" tokens),   z_B = logsumexp(z[t] for t in the "b" tokens)
    P(A) = softmax([z_A, z_B])[0] = sigmoid(z_A - z_B)

The "a" tokens are whichever of "a", " a", "A", " A" the tokenizer encodes as one token (likewise
for "b"): tokenizers differ on whether a reply's first word carries a leading space, and models on
the case they answer in; summing their probability mass (logsumexp of logits) counts every way the
model can say "a". Verdict: "A" if P(A) > 0.5, "B" if < 0.5, "tie" only if z_A == z_B exactly. No
sampling, so the judge is deterministic: asking again gives the same P(A).

MODEL is any `--model` spec: builtin:tiny, a local HF directory, a .gguf file or a hub id.

    rlhf pairwise samples.jsonl --judge lm:benchmarks/.models/smollm2-135m > pairs.jsonl
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any

from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import Ask, JudgeOptions, Verdict, Winner
from rlhf_cli.judges.template import load_template

CHOICES = {"a": ("a", " a", "A", " A"), "b": ("b", " b", "B", " B")}
WINDOW = 8  # asks are read WINDOW batches at a time and sorted by length, so batches pad little


def choice_tokens(tok: Any) -> dict[str, list[tuple[str, int]]]:
    """{"a": [(text, id), ...], "b": [...]}: the variants that are single tokens, each id once."""
    out: dict[str, list[tuple[str, int]]] = {}
    for side, variants in CHOICES.items():
        seen: dict[int, str] = {}
        for v in variants:
            ids = tok(v, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] not in seen:
                seen[ids[0]] = v
        if not seen:
            raise RlhfError(f"the judge's tokenizer has no single token for {side!r}", "use a model with a usual text tokenizer")
        out[side] = [(v, i) for i, v in seen.items()]
    return out


class LocalLMJudge:
    """A pair judge backed by a local causal LM; see the module docstring for how P(A) is read."""

    kind = "lm"

    def __init__(self, model_spec: str, opts: JudgeOptions) -> None:
        from rlhf_cli.models.loading import parse_model_spec

        # cheap validation first: the template and the spec, before any weights load
        self.template = load_template(opts.template)
        self.spec = parse_model_spec(model_spec)
        if opts.batch_size < 1:
            raise RlhfError("--batch-size must be >= 1")
        if opts.dtype not in ("fp32", "bf16", "fp16"):
            raise RlhfError(f"--dtype must be fp32, bf16 or fp16; got {opts.dtype!r}")
        self.name = model_spec
        self.opts = opts
        self.stopped: str | None = None

        from rlhf_cli import runtime
        from rlhf_cli.models.loading import load_model, load_tokenizer

        self.tok = load_tokenizer(self.spec, opts.trust_remote_code)
        self.device = runtime.pick_device(opts.device)
        self.model = load_model(self.spec, self.tok, opts.dtype, opts.trust_remote_code).to(self.device).eval()
        self.choices = choice_tokens(self.tok)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or self.tok.model_max_length)
        self.system_ok = self._accepts_system()
        try:
            self.keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        except (TypeError, ValueError):
            self.keep = {}

    def describe(self) -> dict[str, Any]:
        return {"kind": "lm", "name": self.name, "template": self.template.hash,
                "choice_tokens": {side: [v for v, _ in toks] for side, toks in self.choices.items()}}

    def judge(self, asks: Iterable[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        window: list[Ask] = []
        for ask in asks:
            window.append(ask)
            if len(window) == self.opts.batch_size * WINDOW:
                yield from self._judge_window(window)
                window = []
        yield from self._judge_window(window)

    def close(self) -> None:
        self.model = None
        self.tok = None

    # -- internals ------------------------------------------------------------------------------

    def _judge_window(self, asks: list[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        rendered = [self.render(a) for a in asks]
        order = sorted(range(len(asks)), key=lambda i: len(rendered[i][0]))
        bs = self.opts.batch_size
        for b in range(0, len(order), bs):
            idx = order[b : b + bs]
            diffs = self.logit_diffs([rendered[i][0] for i in idx])
            for i, d in zip(idx, diffs, strict=True):
                ids, truncated = rendered[i]
                yield asks[i], self._verdict(d, len(ids), truncated)

    def _verdict(self, d: float, n_prompt: int, truncated: bool) -> Verdict:
        import math

        p_a = 1.0 / (1.0 + math.exp(-d)) if d > -700 else 0.0  # sigmoid(z_A - z_B), no overflow
        winner: Winner = "A" if d > 0 else "B" if d < 0 else "tie"
        raw = f"p_a={p_a:.4f}" + (" truncated" if truncated else "")
        return Verdict(winner, p_a=p_a, raw=raw, usage={"prompt_tokens": n_prompt, "completion_tokens": 0})

    def render(self, ask: Ask) -> tuple[list[int], bool]:
        """Prompt token ids for one ordered ask, and whether the outputs had to be shortened to fit.

        A prompt longer than the model's context keeps the instruction and the question and cuts
        the end off each output, equally, until it fits.
        """
        a, b = ask.a, ask.b
        ids = self._encode(ask.item.prompt, a, b)
        if len(ids) <= self.max_len:
            return ids, False
        ta = self.tok(a, add_special_tokens=False, verbose=False)["input_ids"]
        tb = self.tok(b, add_special_tokens=False, verbose=False)["input_ids"]
        for _ in range(4):  # re-tokenizing cut text can differ by a token or two; a few rounds settle it
            over = len(ids) - self.max_len
            if over <= 0:
                return ids, True
            keep = max(0, (len(ta) + len(tb) - over) // 2 - 8)
            ta, tb = ta[: min(keep, len(ta))], tb[: min(keep, len(tb))]
            a, b = self.tok.decode(ta), self.tok.decode(tb)
            ids = self._encode(ask.item.prompt, a, b)
            if keep == 0:
                break
        if len(ids) > self.max_len:
            raise RlhfError(f"{ask.item.where or ask.item.id}: the prompt alone is longer than the judge's context ({self.max_len} tokens)",
                            "shorten the prompt or use a judge with a longer context")
        return ids, True

    def _encode(self, instruction: str, a: str, b: str) -> list[int]:
        msgs = self.template.messages(instruction, a, b)
        if not self.system_ok and msgs[0]["role"] == "system":
            # templates that reject a system role (Gemma's) get it as the user message's first paragraph
            msgs = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _accepts_system(self) -> bool:
        try:
            self.tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                         tokenize=False, add_generation_prompt=True)
            return True
        except Exception:  # jinja raises its own TemplateError ("System role not supported")
            return False

    def logit_diffs(self, prompts: list[list[int]]) -> list[float]:
        """z_A - z_B at the last position of each prompt, in one left-padded forward pass."""
        import torch

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0  # a filler, always masked out
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # (N, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)  # (N, T)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # (N, T): positions count from each row's first real token
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **self.keep).logits
        z = logits[:, -1].float()  # (N, V): the next-token logits after the generation prompt
        z_a = z[:, [i for _, i in self.choices["a"]]].logsumexp(-1)  # (N,)
        z_b = z[:, [i for _, i in self.choices["b"]]].logsumexp(-1)  # (N,)
        return (z_a - z_b).tolist()
