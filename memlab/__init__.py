"""memlab: a hands-on lab for memory-efficient training of speech models.

Submodules are imported on demand (``import memlab.memory``, ``from memlab.optim import Adam8bit``)
so that ``import memlab`` stays light.
"""

import os as _os

__version__ = "0.1.0"


def fast_mode() -> bool:
    """True when MEMLAB_FAST is set to something other than '' or '0' (tiny sizes: tests, CI).

    The one place that reads the variable: the lab, the tasks, the benches and the notebooks
    ask this function."""
    return _os.environ.get("MEMLAB_FAST", "") not in ("", "0")
