"""nbgrader's collect, made safe for hostile hand-ins: :class:`SafeCollect`.

``nbgrader collect`` runs with the instructor's rights over a folder every student can write
into (the exchange's ``inbound/``). Its own copy follows symbolic links (a link to the answer
key becomes part of a submission), reads FIFOs (and hangs), and one entry whose name it cannot
parse stops the whole collect, so the students listed after it are never collected. The
course's ``nbgrader_config.py`` selects this class instead (``c.ExchangeFactory.collect``),
so both ``nbgrader collect`` and ``python -m course_lib collect`` use it:

- an entry of ``inbound/`` that is not ``STUDENT+ASSIGNMENT+TIMESTAMP``, names an unsafe
  student id, is not a plain folder or has a timestamp nbgrader cannot read is reported and
  skipped;
- each submission is copied with :func:`.files.copy_own_files` (no links, no special files,
  no hard links), into a new folder that replaces the old one only when the copy is complete;
- where the machine has an account named like the student, a submission folder owned by
  another account is reported (nbgrader's ``check_owner`` does this too, as a warning);
- one submission that cannot be collected is reported with its reason, and the others are
  collected.

Every problem is one log line starting ``NEEDS ATTENTION``; the kit's ``collect`` step counts
them.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile

from nbgrader.exchange.default.collect import ExchangeCollect
from nbgrader.utils import parse_utc

from .files import copy_own_files, valid_student_id

ATTENTION = "NEEDS ATTENTION"


def account_uid(name: str):
    """The uid of the machine's account ``name``, or None where there is none."""
    try:
        import pwd
        return pwd.getpwnam(name).pw_uid
    except (ImportError, KeyError):
        return None


class SafeCollect(ExchangeCollect):
    """``ExchangeCollect`` that never follows a link and never stops for one bad submission."""

    def attention(self, student: str, text: str) -> None:
        self.log.error("%s: %s: %s", ATTENTION, student, text)

    def init_src(self):
        if self.coursedir.course_id == "":
            self.fail("No course id specified. Re-run with --course flag.")
        self.course_path = os.path.join(self.root, self.coursedir.course_id)
        self.inbound_path = os.path.join(self.course_path, "inbound")
        if not os.path.isdir(self.inbound_path):
            self.fail(f"Course not found: {self.inbound_path}")
        student = self.coursedir.student_id or "*"
        pattern = os.path.join(glob.escape(self.inbound_path), f"{student}+{self.coursedir.assignment_id}+*")
        records = [r for r in map(self._checked_record, sorted(glob.glob(pattern))) if r is not None]
        latest: dict = {}
        for record in records:
            if record["username"] not in latest or record["timestamp"] > latest[record["username"]]["timestamp"]:
                latest[record["username"]] = record
        self.src_records = list(latest.values())

    def _checked_record(self, path: str):
        """A record for one inbound entry, or None (reported) if it cannot be a submission."""
        name = os.path.basename(path)
        parts = name.rsplit("+", 3)
        student = parts[0] if parts else name
        shown = student if valid_student_id(student) else repr(student[:60])
        if len(parts) < 3 or not valid_student_id(student):
            self.attention(shown, f"inbound entry {name[:80]!r} is not STUDENT+ASSIGNMENT+TIMESTAMP with a "
                                  f"plain student id; skipped")
            return None
        if os.path.islink(path) or not os.path.isdir(path):
            self.attention(shown, f"inbound entry {name[:80]!r} is not a plain folder (a link or a file); skipped")
            return None
        try:
            timestamp = parse_utc(parts[2])
        except Exception:
            self.attention(shown, f"inbound entry {name[:80]!r} has no readable timestamp; skipped")
            return None
        return {"username": student, "filename": name, "timestamp": timestamp}

    def copy_files(self):
        if not self.src_records:
            self.log.warning("No submissions of '%s' for course '%s' to collect", self.coursedir.assignment_id,
                             self.coursedir.course_id)
        for record in sorted(self.src_records, key=lambda r: r["username"]):
            try:
                self._collect_one(record)
            except Exception as err:
                self.attention(record["username"], f"not collected: {type(err).__name__}: {err}")

    def _collect_one(self, record: dict) -> None:
        student = record["username"]
        source = os.path.join(self.inbound_path, record["filename"])
        owner, uid = os.lstat(source).st_uid, account_uid(student)
        if uid is not None and owner != uid:
            self.attention(student, f"the submission folder {record['filename']!r} is owned by uid {owner}, "
                                    f"not by the account {student} (uid {uid}): handed in by someone else?")
        dest = self.coursedir.format_path(self.coursedir.submitted_directory, student, self.coursedir.assignment_id)
        if os.path.isdir(dest) and not self._newer(dest, record):
            self.log.info("Submission already exists, use --update to update: %s %s", student,
                          self.coursedir.assignment_id)
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".collect-", dir=os.path.dirname(dest))
        try:
            limit = int(self.coursedir.max_dir_size) * 1000
            refused = copy_own_files(source, os.path.join(staging, "copy"), max_bytes=limit,
                                     skip=lambda relative: self._ignored(relative))
            for line in refused:
                self.attention(student, f"{line} (left out of the collected submission)")
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            os.rename(os.path.join(staging, "copy"), dest)
            self.log.info("Collected submission: %s %s", student, self.coursedir.assignment_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _newer(self, dest: str, record: dict) -> bool:
        existing = self.coursedir.get_existing_timestamp(dest)
        if self.update and (existing is None or record["timestamp"] > existing):
            return True
        return bool(self.before_duedate and existing != record["timestamp"])

    def _ignored(self, relative: str) -> bool:
        import fnmatch
        name = os.path.basename(relative)
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.coursedir.ignore)
