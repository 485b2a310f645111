"""`python -m selfspec.cli`: the `selfspec` command."""
from selfspec.cli.main import main

main()
