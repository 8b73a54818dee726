"""The class tournament: every student's backdoor against every student's detector, sandboxed.

After autograding, the class holds working triggers (certified by the grader's own poisoning
run) and working Activation Clustering detectors (certified on the planted example). The
tournament sets them against each other and against the kit's own attacks and defenses
(``python -m course_lib tournament week4 --course assignments``; docs/tournament.md):

==================  =================================================================
module              role
==================  =================================================================
:mod:`.entrants`    who enters, from what autograding recorded, and why others do not
:mod:`.student_code`  a student's function called in the grading sandbox
:mod:`.arenas`      one poisoned training set and model per attack, built by the grader
:mod:`.detectors`   the house detectors and the controls, run by the grader
:mod:`.matches`     the jobs (arenas, cells), cached by their inputs
:mod:`.model_defenses`  Neural Cleanse, STRIP and Fine-Pruning on every arena
:mod:`.scoring`     TPR, FPR, Detection Score, leaderboards and rank intervals
:mod:`.pseudonyms`  names on the page that do not reveal the student
:mod:`.page`        the static HTML page and its images
:mod:`.command`     the command line and the whole run
:mod:`.bench`       per-cell cost, the class-of-300 projection, honesty checks
==================  =================================================================

Student code runs only in sandboxes; the ground truth of each arena never enters one; a
broken or hostile entrant costs only its own cells; no grade is ever changed.
"""
