"""One module per CLI subcommand.

Each module defines `register(subparsers) -> None`, which adds its parser and sets
`func=<callable taking the parsed args>`. `lmlab.cli` discovers the modules here, so a new
command is a new file and nothing else changes.
"""
