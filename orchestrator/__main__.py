"""`python -m orchestrator` runs the changeover CLI."""

from orchestrator.cli import main

main()
