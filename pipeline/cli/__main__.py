"""`python -m pipeline.cli`: the same as the `editbatch` command."""

from pipeline.cli import main

main()
