"""JSONL in/out, the record contract, and SFT batching."""
