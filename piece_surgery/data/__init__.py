"""Training data: files to records, records to tokens, batches."""
