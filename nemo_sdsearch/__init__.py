"""nemo_sdsearch: SD-Search and Search-E1 training for search-augmented reasoning agents."""

__version__ = "0.1.0"
