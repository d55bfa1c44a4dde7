"""The tutorial notebooks, shipped inside the package as ``memlab.notebooks`` (see `memlab lab`)."""
