"""Trusted autograding of the Week 4 homework: grades that student code cannot fake.

The threat model (docs/DESIGN.md): students of this course learn to attack ML pipelines,
and the autograder is the first pipeline they meet. Anything in a submission is hostile
code. It can patch any module in its process, inspect the stack, read or write every file
it can reach, start background processes, and kill or hang its kernel. Grading in the
student's own kernel (nbgrader's default) cannot be secured. So here:

================  ==============================================================
module            role
================  ==============================================================
:mod:`.sandbox`   bubblewrap: no network, read-only system, one size-capped tmpfs,
                  a fresh HOME, resource limits, every process killed at the end
:mod:`.resources` each sandbox's share of the machine: a control group capping
                  its memory, processes and CPU; its own unprivileged uid
:mod:`.plan`      the inputs the grader chooses and the calls it asks for
:mod:`.harvest`   inside the sandbox: run the notebook, perform the calls, write
                  the results as tensors; a dead or hung kernel loses one call
:mod:`.calls`     inside the student's kernel: one call, its result saved
:mod:`.verdicts`  the trusted grader: each test decided from data with the rules
                  of :mod:`course_lib.grading`, in a process the student never runs in
:mod:`.pipeline`  one notebook of one submission: sandbox, verdicts, cache
:mod:`.preprocessor`  the nbgrader preprocessor that replaces ``Execute``
:mod:`.classroom` ``python -m course_lib autograde``: a class in parallel
                  (processes or Dask), nbgrader recording the results
================  ==============================================================

The answer key, the reference model and the hidden zoo's checkpoints never enter a sandbox;
the only secret-derived data a sandbox sees are the hidden zoo models' activations, which is
the detector's input, not its answer.
"""
