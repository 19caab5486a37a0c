"""The one error type the stages raise for bad input or configuration, and how entry points show it."""
import functools
import logging
import sys


class PipelineError(RuntimeError):
    """Bad input or configuration: the message names the file, URL or key and what to do."""


def exit_on_error(main):
    """Show a PipelineError as one clear line and exit with status 2, without a traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as err:
            logging.getLogger(main.__module__).error("%s", err)
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    return wrapper
