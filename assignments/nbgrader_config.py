"""nbgrader configuration of the Week 4 homework. Run every nbgrader command from this folder.

The step-by-step workflow (build the zoo, release, collect, autograde, feedback, export)
is in docs/instructor_guide.md. Autograde a class with the kit's parallel command,
``python -m course_lib autograde week4 --workers N``; nbgrader's own ``nbgrader autograde
week4`` gives the same protection, one student after another.
"""
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import ClearHiddenTests, GetGrades

from course_lib.autograde.preprocessor import autograde_preprocessors

c = get_config()  # noqa: F821 -- provided by nbgrader when it loads this file

c.CourseDirectory.course_id = "adversarial-ml-week4"

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

# Autograding copies the instructor's version of every non-notebook file in
# source/week4 over the submission (so the zoo cannot be tampered with). The model a
# student hands in must survive that copy, even if the instructor has run the source
# notebook and left a model of their own in source/week4.
c.Autograde.exclude_overwriting = {"week4": ["backdoor_model.safetensors", "backdoor_model.json"]}

# Feedback shows the graded notebook; strip the hidden tests' code from it.
c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, ClearHiddenTests]
