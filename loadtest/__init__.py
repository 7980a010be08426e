"""Load generator for stepwise servers; see `python -m loadtest --help`."""
