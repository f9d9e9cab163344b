"""Model loading (hub id, HF dir, .gguf, builtin:*) and checkpoints with a manifest."""
