"""Only the student's own files: copying a hand-in without following anything it points to.

A hand-in is a folder the student made, and every instructor-side step that copies it (the
exchange's collect, the class command's staging and recording) runs with the instructor's
rights. A symbolic link in it would make that copy read whatever the link names (the answer
key, another student's work) and carry it into the submission, its sandbox and its
feedback; a hard link to a file the student could not otherwise read is the same trick; a
FIFO or a device would make the copy hang or read forever. So :func:`copy_own_files` walks
the folder through file descriptors opened with ``O_NOFOLLOW`` (a link swapped in during the
walk is refused too) and copies regular files with one link and plain folders only; every
other entry is left out and named in the returned list, so the step can say which student
handed in what, and go on.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

MAX_FILES = 10_000
MAX_DEPTH = 32
CHUNK = 1 << 20
STUDENT_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,99}")


def valid_student_id(student: str) -> bool:
    """Whether ``student`` can name a folder safely: letters, digits and ``_ . @ -``, not
    starting with a dot (so never ``.`` or ``..``), at most 100 characters."""
    return isinstance(student, str) and STUDENT_ID.fullmatch(student) is not None


def shown(name: str) -> str:
    """A name from a hand-in as it may be printed: itself if plain, else its escaped form (a
    file name can carry terminal control sequences)."""
    return name if name.isprintable() and name.isascii() else ascii(name)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "a special file"


def _copy_file(fd: int, dest: Path, limit: int) -> int:
    """Copy an open regular file to ``dest`` (created new, owner-only until the caller widens it)."""
    written = 0
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        while chunk := os.read(fd, CHUNK):
            written += len(chunk)
            if written > limit:
                raise OSError(f"larger than {limit} bytes")
            os.write(out, chunk)
    finally:
        os.close(out)
    return written


def copy_own_files(source, dest, *, max_bytes: int = 2 * 2**30, skip=lambda relative: False) -> list[str]:
    """Copy the folder ``source`` to ``dest`` (which must not exist): plain folders and regular
    files with a single link only, never following a link. Returns what was left out, one
    ``"relative/path: why"`` line each; raises ``OSError`` only if ``source`` itself is not a
    plain folder or the hand-in is larger than ``max_bytes``. ``skip(relative)`` leaves out
    entries the caller ignores anyway (nbgrader's ignore patterns), without a line.
    """
    refused: list[str] = []
    try:
        top = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        raise OSError(f"{source} is not a plain folder ({err.strerror})") from None
    Path(dest).mkdir(mode=0o700)
    budget = {"bytes": max_bytes, "files": MAX_FILES}
    try:
        _copy_folder(top, Path(dest), "", refused, budget, skip, 0)
    finally:
        os.close(top)
    return refused


def _copy_folder(fd: int, dest: Path, prefix: str, refused: list, budget: dict, skip, depth: int) -> None:
    for name in sorted(os.listdir(fd)):
        relative = shown(f"{prefix}{name}")
        if skip(f"{prefix}{name}"):
            continue
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as err:
            refused.append(f"{relative}: unreadable ({err.strerror})")
            continue
        if stat.S_ISDIR(info.st_mode):
            if depth >= MAX_DEPTH:
                refused.append(f"{relative}: folders nested more than {MAX_DEPTH} deep")
                continue
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                refused.append(f"{relative}: unreadable folder ({err.strerror})")
                continue
            try:
                (dest / name).mkdir(mode=0o700)
                _copy_folder(child, dest / name, f"{prefix}{name}/", refused, budget, skip, depth + 1)
            finally:
                os.close(child)
        elif not stat.S_ISREG(info.st_mode):
            refused.append(f"{relative}: {_kind(info.st_mode)}, not copied")
        else:
            _copy_regular(fd, name, relative, dest / name, refused, budget)


def _copy_regular(fd: int, name: str, relative: str, dest: Path, refused: list, budget: dict) -> None:
    try:
        handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as err:
        refused.append(f"{relative}: unreadable ({err.strerror})")
        return
    try:
        info = os.fstat(handle)          # what was opened, not what the name pointed to before
        if not stat.S_ISREG(info.st_mode):
            refused.append(f"{relative}: {_kind(info.st_mode)}, not copied")
        elif info.st_nlink != 1:
            refused.append(f"{relative}: a hard link (the file has {info.st_nlink} names), not copied")
        elif budget["files"] <= 0:
            refused.append(f"{relative}: more than {MAX_FILES} files, not copied")
        else:
            budget["files"] -= 1
            budget["bytes"] -= _copy_file(handle, dest, max(0, budget["bytes"]))
    finally:
        os.close(handle)
