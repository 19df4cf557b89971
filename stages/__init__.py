"""Entry points, one per training stage: `python stages/<stage>.py --help`."""
