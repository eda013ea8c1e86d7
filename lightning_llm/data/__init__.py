"""Text sources, mixtures, the tokenizer and the data modules."""
