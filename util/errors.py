"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
import functools
import os
import re
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
        msg = re.sub(r"^(?:\w+\.)*\w+: ", "", msg.splitlines()[-1], count=1)  # util.errors.BadImage: ...
    return msg


# gloo's words for a collective whose peer froze (its host stopped: nothing arrives until the
# --dist_timeout) or died (its host's kernel closed the connection).
_PEER_TIMEOUT = re.compile(r"Timed out waiting (\d+)ms for (\w+) operation")
_PEER_CLOSED = re.compile(r"Connection (?:closed|reset) by peer[^\n]*")


def lost_peer(exc):
    """The one line for a collective that lost another rank, or None for other errors."""
    msg = str(exc)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
    after = "the newest checkpoint in output_dir is intact: a requeued or restarted run resumes from it"
    m = _PEER_TIMEOUT.search(msg)
    if m:
        return (f"rank {rank}: a collective {m.group(2)} waited {int(m.group(1)) / 1000:g} s (--dist_timeout) "
                f"for another rank that sent nothing (its host frozen, unreachable or far behind); {after}")
    m = _PEER_CLOSED.search(msg)
    if m:
        return f"rank {rank}: another rank went away mid-collective (gloo: {m.group(0).strip()}); {after}"
    return None


def exit_on_user_error(main):
    """Wrap an entry point so a UserError prints `error: ...` and exits with 2, and a
    collective that lost a peer prints one line and exits with 1 (not a traceback per rank)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            sys.stderr.write(f"error: {_one_line(e)}\n")
            sys.exit(2)
        except RuntimeError as e:
            line = lost_peer(e)
            if line is None:
                raise
            sys.stderr.write(f"error: {line}\n")
            sys.exit(1)
    return wrapper
