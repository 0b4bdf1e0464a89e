"""Ray's token authentication, seen from raysweep: find the token, keep its file private.

Ray 2.60 looks for the token in ``RAY_AUTH_TOKEN``, then in the file named by
``RAY_AUTH_TOKEN_PATH``, then in ``~/.ray/auth_token``; raysweep looks in the same order,
so a token that works for Ray works here. raysweep never turns authentication off: it
sends the token it finds, tightens a token file it uses to mode 0600, and explains what to
do when the cluster refuses it.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


@dataclass(frozen=True)
class Token:
    value: str | None
    source: str  # where it came from, or where raysweep looked, in words

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"} if self.value else {}


def token_file() -> Path:
    """The file Ray reads the token from (``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)."""
    return Path(os.environ[TOKEN_PATH_ENV]).expanduser() if os.environ.get(TOKEN_PATH_ENV) else default_token_path()


def find_token() -> Token:
    """The token a client should send, in Ray's order; a token file found is made private."""
    if os.environ.get(TOKEN_ENV):
        return Token(os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}")
    path = token_file()
    if not path.is_file():
        where = f"${TOKEN_PATH_ENV} ({path})" if os.environ.get(TOKEN_PATH_ENV) else str(path)
        return Token(None, f"no token: ${TOKEN_ENV} is unset and {where} does not exist")
    secure_token_file(path)
    return Token(path.read_text().strip() or None, str(path))


def secure_token_file(path: Path | None = None) -> bool:
    """Make a token file that this user owns readable by its owner only (0600).

    Returns True when the mode was changed (and says so on stderr). A file owned by
    someone else is left alone: changing it is its owner's call.
    """
    path = Path(path) if path else token_file()
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if not st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or st.st_uid != os.getuid():
        return False
    path.chmod(0o600)
    print(f"raysweep: {path} was readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
          "set it to 0600", file=sys.stderr)
    return True


def ensure_token() -> Path:
    """A token file for a cluster raysweep starts: kept if there, else made; mode 0600."""
    path = token_file()
    if not path.is_file() and not os.environ.get(TOKEN_ENV):
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    secure_token_file(path)
    return path


def refused_message(address: str, error: Exception, token: Token) -> str:
    """What to tell a user whose token the cluster refused (HTTP 401 missing, 403 wrong)."""
    what = "sent no token" if token.value is None else f"sent a token the cluster does not accept (from {token.source})"
    return (
        f"the Ray cluster at {address} requires token authentication and raysweep {what}"
        f"{f' ({token.source})' if token.value is None else ''}. "
        f"Fix: on the head node, `ray get-auth-token` prints the cluster's token; here, either "
        f"`export {TOKEN_ENV}=<that token>` or copy the head's ~/.ray/auth_token to "
        f"{default_token_path()} (chmod 600). [{type(error).__name__}: {str(error).splitlines()[0]}]"
    )
