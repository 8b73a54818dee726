"""Pseudonyms: students appear on the published page under names that do not reveal them.

A pseudonym is an HMAC-SHA256 (RFC 2104) of the student id under a secret kept in the
course's private grading folder (``<course>/grading/<assignment>/tournament_secret``, made on
first use, readable by its owner only): the same student gets the same name in every
tournament of the course, and without the secret no one can compute, from an id, which name
is whose (a plain hash of the id could be recomputed by anyone who knows the roster).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

ADJECTIVES = ("amber", "brisk", "calm", "dusky", "eager", "fuzzy", "gentle", "hazel", "icy", "jolly", "keen",
              "lunar", "mossy", "nimble", "olive", "plucky", "quiet", "rusty", "sandy", "tidy", "umber", "vivid",
              "witty", "young", "zesty", "bold", "coral", "dapper", "frosty", "golden", "humble", "ivory")
ANIMALS = ("otter", "heron", "lynx", "marten", "ibis", "gecko", "tapir", "wombat", "puffin", "bison", "civet",
           "dingo", "egret", "ferret", "gibbon", "hyrax", "koala", "lemur", "moose", "newt", "okapi", "panda",
           "quail", "raven", "stoat", "toucan", "urial", "vole", "walrus", "yak", "zebu", "badger")
SECRET_FILE = "tournament_secret"


def course_secret(folder) -> bytes:
    """The course's pseudonym secret in ``folder`` (the private grading folder), made if missing."""
    folder = Path(folder)
    path = folder / SECRET_FILE
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def pseudonym(secret: bytes, student: str) -> str:
    """``adjective-animal-xxxx`` for ``student``, stable under ``secret``."""
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("secret must be at least 16 bytes (course_secret makes one)")
    if not isinstance(student, str) or not student:
        raise ValueError(f"student must be a non-empty id, got {student!r}")
    digest = hmac.new(secret, student.encode(), hashlib.sha256).digest()
    return f"{ADJECTIVES[digest[0] % len(ADJECTIVES)]}-{ANIMALS[digest[1] % len(ANIMALS)]}-{digest[2:4].hex()}"
