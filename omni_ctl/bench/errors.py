"""The one exception type the benchmark commands raise for bad input."""

import click


class BenchError(click.ClickException):
    """A benchmark option or input is wrong; the message names it and its value."""
