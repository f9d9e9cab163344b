"""Evaluations behind `rlhf eval KIND`: each kind is one module (config, Typer command, `evaluate`)."""
