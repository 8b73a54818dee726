"""nbgrader configuration of the Week 4 homework. Run every nbgrader command from this folder.

The step-by-step workflow (build the zoo, release, collect, autograde, feedback, export)
is in docs/instructor_guide.md.
"""
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import ClearHiddenTests, GetGrades

c = get_config()  # noqa: F821 -- provided by nbgrader when it loads this file

c.CourseDirectory.course_id = "adversarial-ml-week4"

# Autograding re-runs each notebook with the kernel recorded in it ("python3": the Python
# environment nbgrader runs in). Training cells are skipped (NBGRADER_EXECUTION=autograde);
# the slowest graded cell recomputes clean accuracy and ASR on 10,000 test images or runs a
# student's detector on every zoo model: seconds on a laptop CPU. A cell still running after
# `timeout` seconds (an endless loop) is interrupted and fails, and grading goes on.
c.Execute.kernel_name = "python3"
c.Execute.timeout = 120
# The kernel does not put the submission folder on sys.path: a handed-in course_lib/ (or
# torch/) folder must not replace the grader's own modules. (nbgrader's default argument,
# an in-memory history file, is kept.)
c.Execute.extra_arguments = ["--HistoryManager.hist_file=:memory:", "--InteractiveShellApp.ignore_cwd=True"]

# Autograding copies the instructor's version of every non-notebook file in
# source/week4 over the submission (so the zoo cannot be tampered with). The model a
# student hands in must survive that copy, even if the instructor has run the source
# notebook and left a model of their own in source/week4.
c.Autograde.exclude_overwriting = {"week4": ["backdoor_model.safetensors", "backdoor_model.json"]}

# Feedback shows the graded notebook; strip the hidden tests' code from it.
c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, ClearHiddenTests]
