"""RL experience for `ppo` and `grpo`: the models, the rollout batch, its scores and the training forwards.

    tok, pv, ref, *_ = setup_models(ppo_config, device, ref_dtype)   # policy (+LoRA), value (from the RM), reference
    batch = collect(pv, ref, tok, prompt_ids, sampling, seed, device, chunk=8, pad=pad)   # ppo: one response each, no grad
    raw = score_responses(judge, rows, batch.completions, device, offload, reference)   # (N,) RM or rule
    logp, entropy, values = pv(batch.ids, batch.mask, batch.prompt_width, batch.response, batch.response_mask)

    groups = sample_groups(policy, tok, [(prompt_ids, seed)], sampling, device, pad)   # grpo: K responses per prompt
    logp = PolicyLogprobs(policy, temperature)(groups.ids, groups.mask, groups.prompt_width, ...)
    ref_logp = reference_logprobs(ref, policy, temperature, groups)   # either batch; ref None = LoRA adapter off

Layout of every tensor (N rollouts, P prompt columns, G response columns): prompts left-padded and
responses right-padded, so `ids[:, :P]` is the prompt and `ids[:, P:]` the response, and the state
that produces response token t is position P - 1 + t for every row (generation.py).
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from rlhf_cli.errors import RlhfError
from rlhf_cli.generation import Completion, SamplingParams, generate, left_pad, pad_responses, response_logprobs
from rlhf_cli.models.reward import token_values

if TYPE_CHECKING:
    from rlhf_cli.commands.ppo import PpoConfig
    from rlhf_cli.data.records import PromptRow
    from rlhf_cli.judges.base import ScoreJudge


class Rollout(NamedTuple):
    """One PPO step's experience (everything detached)."""

    ids: torch.Tensor  # (N, P+G) prompt + response tokens
    mask: torch.Tensor  # (N, P+G) attention mask
    prompt_width: int  # P
    response: torch.Tensor  # (N, G) response tokens (EOS included when sampled)
    response_mask: torch.Tensor  # (N, G) bool, True on real response tokens
    logp: torch.Tensor  # (N, G) log pi_old(y_t), at the sampling temperature
    ref_logp: torch.Tensor  # (N, G) log pi_ref(y_t)
    values: torch.Tensor  # (N, G) V_old(s_t)
    entropy: torch.Tensor  # (N, G) entropy of pi_old at each step
    has_eos: torch.Tensor  # (N,) bool: the response ended with EOS (else it hit max_new_tokens)
    completions: list[Completion]
    engine_logp: torch.Tensor | None = None  # (N, G) the inference engine's log-probs, when an engine sampled


class _Rows(NamedTuple):
    ids: torch.Tensor
    mask: torch.Tensor
    prompt_width: int
    response: torch.Tensor
    response_mask: torch.Tensor


class PolicyAndValue(nn.Module):
    """The two trained networks in one module, so DDP, the optimizer and the resume state see both.

    forward -> per-response-token log-probs and entropy of the policy, and the value model's V(s_t);
    with `ptx` (an SFT batch: input_ids, labels, ...) also the policy's summed NLL on it (PPO-ptx).
    """

    def __init__(self, policy: nn.Module, value: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        # Any: HF models (peft-wrapped with --lora) whose methods nn.Module's typing cannot see
        self.policy: Any = policy
        self.value: Any = value
        self.temperature = temperature

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, response: torch.Tensor,
                response_mask: torch.Tensor, ptx: dict[str, torch.Tensor] | None = None):
        logp, entropy, ptx_nll = self.policy_outputs(ids, mask, prompt_width, response, response_mask, ptx)
        values = self.values(ids, mask, prompt_width, response.shape[1])
        return (logp, entropy, values) if ptx_nll is None else (logp, entropy, values, ptx_nll)

    def policy_outputs(self, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, response: torch.Tensor,
                       response_mask: torch.Tensor, ptx: dict[str, torch.Tensor] | None = None):
        """The policy's half of forward: log-probs and entropy (N, G), and the summed NLL on `ptx` (or None)."""
        logp, entropy = response_logprobs(self.policy, ids, mask, prompt_width, response, response_mask,
                                          self.temperature, with_entropy=True)
        if ptx is None:
            return logp, entropy, None
        from rlhf_cli.training import CausalLMLoss

        return logp, entropy, CausalLMLoss(self.policy)(**ptx)

    def values(self, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, length: int) -> torch.Tensor:
        """V(s_t) of the response tokens.  -> (N, length)"""
        return token_values(self.value, ids, mask, prompt_width, length)


@torch.no_grad()
def reference_logprobs(ref: nn.Module | None, policy: Any, temperature: float, b: Any, chunk: int = 8) -> torch.Tensor:
    """log pi_ref of the sampled response tokens (N, G), `chunk` rows per forward: a separate frozen
    model, or (LoRA, ref None) the policy with its adapter off (peft: the base weights, no second copy).
    b: anything with ids, mask, prompt_width, response, response_mask (a Rollout, a GroupBatch)."""
    off = policy.disable_adapter() if ref is None else contextlib.nullcontext()
    parts = []
    with off:
        for s in range(0, b.ids.shape[0], chunk):
            sl = slice(s, s + chunk)
            parts.append(response_logprobs(ref if ref is not None else policy, b.ids[sl], b.mask[sl], b.prompt_width,
                                           b.response[sl], b.response_mask[sl], temperature).float())
    return torch.cat(parts)


@torch.no_grad()
def collect(pv: PolicyAndValue, ref: nn.Module | None, tok: Any, prompts: list[list[int]], params: SamplingParams,
            seed: int, device: str, chunk: int, pad: int, offload: bool = False, engine: Any = None) -> Rollout:
    """Sample one response per prompt from the policy, keeping the sampler's own log-probs and entropy
    (the behaviour policy, at the sampling temperature: no second policy forward), then score every
    token with the reference and the value model, `chunk` rollouts per forward. Samples an inference
    `engine` drew get the trainer's own log-probs and entropy (one more forward); the engine's are kept apart.
    With `offload` the reference comes to `device` only after generation and leaves before training."""
    if engine is not None:
        comps = [c[0] for c in engine.generate(prompts, params, seed, logprobs=True)]
    else:
        comps = [c[0] for c in generate(pv.policy, tok, prompts, params, device, seed, track=True)]
    prompt_ids, prompt_mask = left_pad(prompts, pad, device)
    ids, mask, response, rmask = pad_responses(prompt_ids, prompt_mask, [c.token_ids for c in comps], pad)
    p, g = prompt_ids.shape[1], response.shape[1]
    logp = torch.tensor([(c.logprobs or []) + [0.0] * (g - len(c.token_ids)) for c in comps], device=device)  # (N, G)
    engine_logp = None
    if engine is not None:
        engine_logp = logp * rmask
        logp, ent = trainer_logprobs(pv.policy, _Rows(ids, mask, p, response, rmask), pv.temperature, chunk)
    else:
        ent = torch.tensor([(c.entropies or []) + [0.0] * (g - len(c.token_ids)) for c in comps], device=device)
    values = torch.cat([pv.values(ids[s : s + chunk], mask[s : s + chunk], p, g) for s in range(0, len(comps), chunk)]) * rmask
    with placed(ref, device, offload):
        ref_logp = reference_logprobs(ref, pv.policy, pv.temperature, _Rows(ids, mask, p, response, rmask), chunk)
    has_eos = torch.tensor([c.finish_reason == "stop" for c in comps], device=device)
    return Rollout(ids, mask, p, response, rmask, logp, ref_logp, values, ent, has_eos, comps, engine_logp)


class GroupBatch(NamedTuple):
    """GRPO's experience on one process, group-major (rows g*K .. g*K+K-1 answer prompt g), detached."""

    ids: torch.Tensor  # (N, P+G) left-padded prompt + right-padded response
    mask: torch.Tensor  # (N, P+G)
    prompt_width: int  # P
    response: torch.Tensor  # (N, G)
    response_mask: torch.Tensor  # (N, G) bool
    logp: torch.Tensor  # (N, G) the sampler's log-probs: the old policy, at the sampling temperature
    entropy: torch.Tensor  # (N, G) entropy of the sampling distribution at each step
    truncated: torch.Tensor  # (N,) bool: cut off at max_new_tokens without EOS
    completions: list[Completion]
    engine_logp: torch.Tensor | None = None  # (N, G) the inference engine's log-probs, when an engine sampled
    rescored: bool = True  # False: an engine sampled and `logp` / `entropy` wait for the update's own forward


@torch.no_grad()
def sample_groups(model: nn.Module, tok: Any, chunks: list[tuple[list[list[int]], int]], params: SamplingParams, device: str,
                  pad: int, engine: Any = None, rescore: bool = True) -> GroupBatch:
    """params.n samples of each prompt, one sampling call per (prompts, seed) chunk. Our KV-cached sampler
    keeps its own log-probs and entropy (the behaviour policy: no second forward); samples an inference
    `engine` drew (engines/vllm.py) are scored again by the trainer's forward, their log-probs kept apart.
    rescore=False skips that forward when the update's first forward is at the sampling weights anyway
    (one pass, one minibatch: grpo_step.update then takes the old log-probs from it, as TRL does)."""
    comps: list[Completion] = []
    rows: list[list[int]] = []
    for prompts, seed in chunks:
        groups = engine.generate(prompts, params, seed, logprobs=True) if engine else generate(model, tok, prompts, params, device, seed, track=True)
        comps += [c for g in groups for c in g]
        rows += [p for p in prompts for _ in range(params.n)]
    prompt_ids, prompt_mask = left_pad(rows, pad, device)
    ids, mask, response, rmask = pad_responses(prompt_ids, prompt_mask, [c.token_ids for c in comps], pad)
    p, g = prompt_ids.shape[1], response.shape[1]
    logp = torch.tensor([(c.logprobs or []) + [0.0] * (g - len(c.token_ids)) for c in comps], device=device)  # (N, G)
    truncated = torch.tensor([c.finish_reason != "stop" for c in comps], device=device)
    if engine is not None and not rescore:
        return GroupBatch(ids, mask, p, response, rmask, logp * rmask, torch.zeros_like(logp), truncated, comps,
                          engine_logp=logp * rmask, rescored=False)
    if engine is not None:
        old, ent = trainer_logprobs(model, _Rows(ids, mask, p, response, rmask), params.temperature)
        return GroupBatch(ids, mask, p, response, rmask, old, ent, truncated, comps, engine_logp=logp * rmask)
    ent = torch.tensor([(c.entropies or []) + [0.0] * (g - len(c.token_ids)) for c in comps], device=device)
    return GroupBatch(ids, mask, p, response, rmask, logp, ent, truncated, comps)


def check_engine(engine: str, engine_logprobs: bool, model: str) -> None:
    """`--engine vllm` (ppo, grpo), before any model loads: one process, vLLM importable (engines.check_engine)."""
    from rlhf_cli.engines import check_engine as check

    if engine_logprobs and engine != "vllm":
        raise RlhfError("--engine-logprobs needs --engine vllm (our own sampler's log-probs are the trainer's)")
    check(engine, [model])


def start_engine(engine: str, model: nn.Module, tok: Any, workdir: Path, dtype: str, memory: float, seed: int,
                 max_len: int) -> Any:
    """`--engine vllm`: an in-process vLLM engine on the policy's current weights (a resumed run's too), or
    None for our own sampler. It reports log-probs after temperature, as the trainer computes them."""
    if engine != "vllm":
        return None
    from rlhf_cli.engines.vllm import VllmEngine

    return VllmEngine.from_model(model, tok, workdir, dtype=dtype, memory=memory, seed=seed, max_len=max_len,
                                 logprobs_mode="processed_logprobs")


@torch.no_grad()
def trainer_logprobs(model: Any, b: Any, temperature: float, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's own log-probs and entropy (N, G) of sampled responses, `chunk` rows per forward: the old
    policy when an inference engine sampled (its kernels round differently). b: ids, mask, prompt_width, ..."""
    parts = [response_logprobs(model, b.ids[s : s + chunk], b.mask[s : s + chunk], b.prompt_width, b.response[s : s + chunk],
                               b.response_mask[s : s + chunk], temperature, with_entropy=True)
             for s in range(0, b.ids.shape[0], chunk)]
    return torch.cat([lp.float() for lp, _ in parts]), torch.cat([e.float() for _, e in parts])


class PolicyLogprobs(nn.Module):
    """forward(ids, mask, prompt_width, response, response_mask) -> (N, G) log-probs of the response tokens
    at the sampling temperature; one module around the policy, so DDP sees every parameter (GRPO)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.model: Any = model
        self.temperature = temperature

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, response: torch.Tensor,
                response_mask: torch.Tensor) -> torch.Tensor:
        return response_logprobs(self.model, ids, mask, prompt_width, response, response_mask, self.temperature)


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio pi_new / pi_old must be 1 when nothing has changed: no dropout anywhere (as TRL)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            setattr(m, "attention_dropout", 0.0)  # noqa: B010 (a float attribute, not a submodule)


@contextlib.contextmanager
def placed(model: nn.Module | None, device: str, offload: bool) -> Iterator[None]:
    """With `offload` (CUDA), keep a frozen model in CPU memory and bring it to `device` only for its phase."""
    if not offload or model is None:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- the networks ---------------------------------------------------------------------------------


class Models(NamedTuple):
    tok: Any
    pv: PolicyAndValue
    ref: nn.Module | None  # None: the LoRA policy with its adapter disabled
    value_from: str  # "reward" | "policy"
    ref_from: str  # for the log line


def setup_models(cfg: PpoConfig, device: str, ref_dtype: str) -> Models:
    """Policy (+LoRA), value model (from the RM by default, as InstructGPT), frozen reference; `cfg` is a PpoConfig.

    The value model starts as the reward model because both map a (prompt, partial response) to a
    number of the same scale, so the first advantages are not noise (InstructGPT, sec. 3.5); with a
    rule judge, or an RM whose vocabulary differs from the policy's, it starts from the policy's own
    weights with a fresh head.
    """
    from rlhf_cli.errors import RlhfError
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec
    from rlhf_cli.models.reward import add_reward_lora, load_reward_model
    from rlhf_cli.training import add_lora, enable_activation_checkpointing

    t = cfg.train
    spec = parse_model_spec(cfg.model)
    tok = load_tokenizer(spec, t.trust_remote_code)
    policy = load_model(spec, tok, "fp32", t.trust_remote_code)
    value_from = cfg.value_init
    if value_from == "auto":
        value_from = "reward" if cfg.reward and _same_vocab(tok, cfg.reward, t.trust_remote_code) else "policy"
    if value_from == "reward" and not cfg.reward:
        raise RlhfError("--value-init reward needs --reward RM_DIR")
    value_spec = parse_model_spec(cfg.reward) if value_from == "reward" and cfg.reward else spec
    value = load_reward_model(value_spec, load_tokenizer(value_spec, t.trust_remote_code), "fp32", t.trust_remote_code)
    if value_from == "reward" and cfg.reward:
        rescale_head(value, *reward_stats(cfg.reward))
    for m in (policy, value):
        disable_dropout(m)
        if t.gradient_checkpointing:
            enable_activation_checkpointing(m)
    if t.lora_r:
        policy, value = add_lora(policy, t.lora_r, t.lora_alpha), add_reward_lora(value, t.lora_r, t.lora_alpha)
    ref, ref_from = None, "the policy with its LoRA adapter disabled"
    if cfg.ref or not t.lora_r:
        ref_spec = parse_model_spec(cfg.ref) if cfg.ref else spec
        ref = load_model(ref_spec, tok, ref_dtype, t.trust_remote_code).eval().requires_grad_(False)
        disable_dropout(ref)
        ref = ref.to("cpu" if cfg.offload else device)
        ref_from = f"{ref_spec.raw} ({ref_dtype})"
    return Models(tok, PolicyAndValue(policy, value, cfg.temperature).to(device), ref, value_from, ref_from)


def reward_stats(path: str) -> tuple[float, float]:
    """(mean, std) of a reward model's training-set scores from its manifest (`train-rm` writes them);
    (0, 1) when absent. PPO normalises scores with them, and the value model starts in that scale."""
    from rlhf_cli.models.checkpoint import MANIFEST
    from rlhf_cli.models.loading import read_json_object

    manifest = Path(path) / MANIFEST
    metrics = read_json_object(manifest).get("metrics", {}) if manifest.is_file() else {}
    mean, std = metrics.get("reward_mean"), metrics.get("reward_std")
    return (float(mean), float(std)) if mean is not None and std else (0.0, 1.0)


@torch.no_grad()
def rescale_head(model: nn.Module, mean: float, std: float) -> None:
    """Make a reward model's head predict normalised scores, (r - mean) / std: the value targets.

    The head is linear, so dividing its weight (and bias) by std rescales every output; the mean
    moves into the bias where there is one (Llama-style `score` heads have none, and the value loss
    learns the remaining offset within a few steps).
    """
    head = typing.cast(nn.Linear, model.score)
    head.weight.div_(std)
    if head.bias is not None:
        head.bias.sub_(mean).div_(std)


def _same_vocab(tok: Any, reward: str, trust_remote_code: bool) -> bool:
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    return load_tokenizer(parse_model_spec(reward), trust_remote_code).get_vocab() == tok.get_vocab()


def score_responses(scorer: ScoreJudge, rows: list[PromptRow], comps: list[Completion], device: str, offload: bool, reference: str) -> torch.Tensor:
    """(n,) raw scores of each response by the reward model or rule (the judge interface of `pairwise`);
    with `offload` the reward model visits `device` only for this call."""
    from rlhf_cli.data.records import Item, render_messages

    items = [Item(r.id, render_messages(r.messages) if r.messages is not None else r.prompt or "", (c.text,), r.extra, r.messages, r.where)
             for r, c in zip(rows, comps, strict=True)]
    mover = getattr(scorer, "move", None)
    if offload and mover is not None:
        mover(device)
    scores = [s[0] for s in scorer.score(items)]
    if offload and mover is not None:
        mover("cpu")
    for r, s in zip(rows, scores, strict=True):
        if s is None:
            raise RlhfError(f"{r.where}: the judge cannot score this prompt (no '{reference}' field?)",
                            "give every prompt row a reference, or use --reward")
    return torch.tensor(scores, dtype=torch.float32, device=device)
