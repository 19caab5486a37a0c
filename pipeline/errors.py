"""The error types the pipeline raises for bad input or configuration, and how entry points show them."""
import functools
import logging
import sys


class PipelineError(RuntimeError):
    """Bad input or configuration: the message names the file, URL or key and what to do."""


class DataError(PipelineError):
    """A data file (a packed split, a folder of images) is missing or not what the pipeline writes."""


class RunNotFound(PipelineError):
    """No trained run, or no readable checkpoint, where one was asked for."""


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
