"""A file for a secret shown once (a webhook's HMAC secret, an external
client's configuration with its private key)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import click


class SecretFile:
    """Opened (mode 0600) before the command that makes the secret is sent,
    so that a path that cannot be written sends nothing; removed again if
    the command fails. `exclusive`: refuse a file that exists."""

    def __init__(self, path: Path, what: str, *, exclusive: bool) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        try:
            self._fd: int | None = os.open(path, flags, 0o600)
        except OSError as exc:
            raise click.ClickException(f"cannot write {what} to {path}: {exc.strerror}") from None

    @contextlib.contextmanager
    def removed_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self.path.unlink(missing_ok=True)
            raise

    def write(self, text: str) -> None:
        assert self._fd is not None, "written once"
        with os.fdopen(self._fd, "w") as f:
            f.write(text)
        self._fd = None


def secret_file(path: Path | None, what: str, *, exclusive: bool) -> SecretFile | None:
    return SecretFile(path, what, exclusive=exclusive) if path is not None else None


@contextlib.contextmanager
def removed_on_failure(out: SecretFile | None) -> Iterator[None]:
    """`out.removed_on_failure()`, for an optional file."""
    if out is None:
        yield
        return
    with out.removed_on_failure():
        yield
