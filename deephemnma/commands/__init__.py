"""One module per CLI subcommand (see :mod:`deephemnma.cli` for the protocol)."""
