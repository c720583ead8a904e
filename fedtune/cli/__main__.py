"""`python -m fedtune.cli`: the same as the `fedtune` command."""

from fedtune.cli import main

main()
