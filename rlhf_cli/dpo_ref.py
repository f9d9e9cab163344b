"""`rlhf dpo`'s reference log-probs: a separate frozen model, the LoRA policy with its adapter off, or
a table computed once before training (`--precompute-ref`). Called by the loop in commands/dpo.py.

    scorer = RefScorer(cfg, policy, ref, pad, device, root=session.forward)
    ref_logp = scorer(microbatch, batch_tensors)     # (S,) summed answer log-probs, or None for simpo
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rlhf_cli.commands.dpo import DpoConfig
    from rlhf_cli.data.pref_data import PrefExample
    from rlhf_cli.runtime import Dist


class RefScorer:
    """The frozen reference's summed answer log-probs: a separate model, the LoRA policy with its
    adapter off (no second copy), or values computed once before training (`--precompute-ref`)."""

    def __init__(self, cfg: DpoConfig, policy: Any, ref: Any, pad: int, device: str, root: Any = None) -> None:
        self.cfg, self.policy, self.ref, self.pad, self.device = cfg, policy, ref, pad, device
        self.root = root  # the module the loop calls; with --shard full, the FSDP root holding the policy
        self.adapter_off = ref is None and cfg.loss != "simpo"  # the reference is the LoRA policy, adapter off
        self.table: dict[int, torch.Tensor] = {}
        self.source = ("none (reference-free)" if cfg.loss == "simpo" else
                       cfg.ref or cfg.model if ref is not None else "the policy with its LoRA adapter disabled")

    def live(self, b: dict[str, Any]) -> torch.Tensor:
        import contextlib

        import torch

        from rlhf_cli.commands import dpo
        from rlhf_cli.training import SequenceLogprobs

        model = self.ref if self.ref is not None else self.policy
        off = self.policy.disable_adapter() if self.ref is None else contextlib.nullcontext()
        with torch.no_grad(), off, self.gathered():
            return SequenceLogprobs(model)(*dpo.seq_args(b)).float()

    def gathered(self, frozen: bool = False) -> Any:
        """--shard full: the adapter-free policy runs outside the training forward, so on gathered weights;
        `frozen`: a --ref-shard reference too (held-out and precompute passes, uneven over ranks)."""
        import contextlib

        from rlhf_cli.sharding import full_params

        if self.adapter_off and self.root is not None:
            return full_params(self.root)
        return full_params(self.ref) if frozen and self.ref is not None else contextlib.nullcontext()

    def __call__(self, mb: list[tuple[int, PrefExample]], b: dict[str, Any]) -> torch.Tensor | None:
        import torch

        if self.cfg.loss == "simpo":
            return None
        if self.table:  # --precompute-ref: every training and held-out row is in it
            return torch.cat([self.table[idx] for idx, _ in mb]).to(self.device)
        return self.live(b)

    def precompute(self, examples: list[tuple[int, PrefExample]], batch_size: int, dist: Dist, state_dir: Path) -> None:
        """Every example's reference log-probs once; kept in OUT-state/ so a resumed run reads them back."""
        from safetensors.torch import load_file, save_file

        from rlhf_cli import runtime
        from rlhf_cli.commands import dpo

        path = state_dir / "ref_logprobs.safetensors"
        if not path.is_file():
            table: dict[str, torch.Tensor] = {}
            with self.gathered(frozen=True):  # --shard full: rank 0 alone runs the reference
                if dist.main:
                    for i in range(0, len(examples), batch_size):
                        mb = examples[i : i + batch_size]
                        b = dpo.batch_tensors(mb, self.pad, self.device, self.cfg.packing, self.cfg.share_prompt)
                        logp, start = self.live(b).cpu(), 0
                        for idx, ex in mb:
                            table[str(idx)] = logp[start : start + len(ex.seqs)].contiguous()
                            start += len(ex.seqs)
                    state_dir.mkdir(parents=True, exist_ok=True)
                    save_file(table, str(path))
            runtime.barrier()
        self.table = {int(k): v for k, v in load_file(str(path)).items()}
        self.ref = None  # one model in memory from here on
        runtime.release_cache(self.device)
