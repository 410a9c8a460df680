"""`python -m piece_surgery ...` runs the command line."""

from piece_surgery.cli import main

main()
