"""One module per command: plain functions that read top to bottom over the layers below."""
