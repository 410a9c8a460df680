"""What every layer stands on: errors, records and their JSON, dtypes, progress, processes."""
