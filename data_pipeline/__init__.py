"""Data pipeline: source converters -> WebDataset shards -> streaming training batches."""
