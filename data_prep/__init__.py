"""Image folders and built-in data sets to WebDataset shards (see make_shards)."""
