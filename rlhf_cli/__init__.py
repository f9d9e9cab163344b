"""rlhf: the InstructGPT recipe as small composable Unix steps (sft, sample, ...)."""

__version__ = "0.1.0"
