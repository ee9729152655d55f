"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
import functools
import sys


class UserError(Exception):
    """Bad input or configuration that the user can fix."""


class BadImage(UserError):
    """An image file that cannot be read: one line naming it, or skipped (--skip_bad_images)."""


def _one_line(exc):
    msg = str(exc).strip()
    # DataLoader workers re-raise with the worker's traceback in the message;
    # the user only needs its last line, without the exception's module path.
    if "Original Traceback" in msg:
        msg = msg.splitlines()[-1].split("UserError: ", 1)[-1]
    return msg


def exit_on_user_error(main):
    """Wrap an entry point so a UserError prints `error: ...` and exits with 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            sys.stderr.write(f"error: {_one_line(e)}\n")
            sys.exit(2)
    return wrapper
