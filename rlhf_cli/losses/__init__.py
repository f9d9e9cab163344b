"""Pure tensor math: each loss is a function with its equation and shapes in the docstring."""
