"""Built-in strategies (kept as an import path): they live in ``memlab.techniques.builtin``."""

from memlab.techniques import builtin  # noqa: F401  (importing registers them)
