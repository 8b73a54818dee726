"""nbgrader configuration of the Week 4 homework. nbgrader reads it from the folder it runs in:
run ``nbgrader ...`` from this folder, or the kit's ``python -m course_lib STEP --course
assignments`` from the repository root (it runs nbgrader here for you).

The step-by-step workflow (build the zoo, release, collect, autograde, feedback, export)
is in docs/instructor_guide.md. Autograde a class with the kit's parallel command,
``python -m course_lib autograde week4 --course assignments --workers N``; nbgrader's own
``nbgrader autograde week4`` gives the same protection, one student after another.
"""
import os

from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import ClearHiddenTests, GetGrades

from course_lib.autograde.preprocessor import MarkPending, autograde_preprocessors

c = get_config()  # noqa: F821 -- provided by nbgrader when it loads this file

c.CourseDirectory.course_id = "adversarial-ml-week4"

# The exchange (release, fetch, submit, collect, feedback): a folder every student can reach, so
# never inside this (private) course folder: nbgrader's default /srv/nbgrader/exchange, or the
# folder NBGRADER_EXCHANGE names. docs/instructor_guide.md, "A course on one shared machine".
c.Exchange.root = os.environ.get("NBGRADER_EXCHANGE", "/srv/nbgrader/exchange")

# Collect copies only each student's own files: never through a link, never a FIFO or a device,
# and one bad entry in the exchange never stops the others (course_lib/autograde/collect.py).
c.ExchangeFactory.collect = "course_lib.autograde.collect.SafeCollect"

# What a student's unfinished function raises (nbgrader's default has an empty message).
c.ClearSolutions.code_stub = {"python": '# YOUR CODE HERE\nraise NotImplementedError("not implemented yet: '
                                        'replace this line with your code")'}

# Trusted autograding. nbgrader's default Execute runs the hidden tests in the student's own
# kernel, where the student's code can patch them; TrustedExecute replaces it: the student's
# cells run in a bubblewrap sandbox (no network, no access to grading/, the gradebook or other
# submissions; CPU, memory, file-size and time limits), and every test is decided in this
# process from what the student's functions returned (course_lib/autograde/). Training cells
# are skipped (NBGRADER_EXECUTION=autograde). A cell or graded call still running after
# `timeout` seconds is stopped; only the tests that needed it fail.
c.Autograde.autograde_preprocessors = autograde_preprocessors()
c.TrustedExecute.timeout = 120
c.TrustedExecute.notebook_timeout = 600
# Where no sandbox can be made, autograding refuses to run; this switch accepts the loss:
# c.TrustedExecute.unsafe_no_sandbox = True
# Each sandbox's share of the machine (all its processes together; defaults for a 24 GiB,
# 2-core machine grading with 2 workers; the kit's autograde command reads them too):
c.TrustedExecute.sandbox_memory_gb = 4.0
c.TrustedExecute.disk_gb = 2.0
c.TrustedExecute.processes = 256
# Where such a cap cannot be made (no cgroup-tools or systemd, not root), autograding refuses to
# run; this switch accepts the loss:
# c.TrustedExecute.unsafe_no_limits = True

# Autograding copies the instructor's version of every non-notebook file in
# source/week4 over the submission (so the zoo cannot be tampered with). The model a
# student hands in must survive that copy, even if the instructor has run the source
# notebook and left a model of their own in source/week4.
c.Autograde.exclude_overwriting = {"week4": ["backdoor_model.safetensors", "backdoor_model.json"]}

# Feedback shows the graded notebook; strip the hidden tests' code from it, and mark answers that
# still need manual grading as pending (nbgrader shows them as a score of 0).
c.GenerateFeedback.preprocessors = [GetGrades, MarkPending, CSSHTMLHeaderPreprocessor, ClearHiddenTests]
