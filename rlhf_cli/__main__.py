"""`python -m rlhf_cli` is the same as the `rlhf` console script."""

from rlhf_cli.cli import main

if __name__ == "__main__":
    main()
