"""memlab: a hands-on lab for memory-efficient training of speech models.

Submodules are imported on demand (``import memlab.memory``, ``from memlab.optim import Adam8bit``)
so that ``import memlab`` stays light.
"""

__version__ = "0.1.0"
