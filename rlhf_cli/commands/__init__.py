"""One module per pipeline step: a frozen config, a thin Typer command, and `run(cfg)`."""
