"""The Week 4 homework's grading code: its rules, and the checks that apply them.

One job per module, and each module builds only on those above it in this table (no two
import each other):

==================  =====================================================================
module              its job
==================  =====================================================================
:mod:`.rules`       every threshold of the homework, and how a failed check is reported
                    (:class:`~.rules.GradingFailure`, every problem listed at once)
:mod:`.files`       the data the grader measures on, and the instructor's private grading
                    folder (answer key, clean reference model, the hidden zoo)
:mod:`.part1`       Part 1's rules: a trigger, a poisoning function, a handed-in model
:mod:`.witness`     the grader's own poisoning run: does a trigger plant a backdoor in a
                    model the grader trains itself?
:mod:`.part2`       Part 2's rules: activations, and a detector's flags on the planted
                    example and on the hidden zoo
:mod:`.kernel`      the ``check_*`` functions a notebook's test cells call, in the
                    student's own kernel (feedback while working; never the grade)
==================  =====================================================================

Why the rules are functions of *data*: students of this course learn to attack ML pipelines,
and the autograder is one. The trusted autograder (:mod:`course_lib.autograde`) never trusts
a student's kernel: it runs the student's functions in a sandbox, reads back what they
returned, and applies the rules of :mod:`.part1`, :mod:`.witness` and :mod:`.part2` in its
own process. The notebooks import all of this through one stable name,
:mod:`course_lib.grading`. The class tournament (:mod:`course_lib.tournament`) reuses the
rules and the grader's poisoning run.
"""
