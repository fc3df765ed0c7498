"""`python -m modelsense`: the command-line interface."""

from modelsense.cli import main

main()
