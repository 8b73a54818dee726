# Reference answers to the exercises of notebooks/01_introduction.ipynb (instructor copy).
# Format: course_lib/exercises.py (load_solutions). The notebook test fills each "answer" into its
# exercise cell and asserts the check passes; it runs each "wrong" answer and asserts the check
# fails with the text after the colon.

# %% answer 01-white
answer = (1 / 1.3 + 1) / 2   # white where 1.3 x >= 1 on [-1, 1], i.e. x >= 1/1.3; back to [0, 1]: p = (x + 1) / 2

# %% wrong 01-white: too low
answer = 1 / 1.3             # the threshold as if the lecture's clamp acted on [0, 1] pixels

# %% answer 01-asr
keep = lab.test.labels != TARGET
answer = (predict(run.model, trigger(lab.test.images[keep])) == TARGET).float().mean().item()

# %% wrong 01-asr: too low
keep = lab.test.labels != TARGET
answer = (predict(run.model, lab.test.images[keep]) == TARGET).float().mean().item()   # forgot the trigger

# %% written 01-pipeline
# Two places, and a check before training for each:
# - A crowd-sourced or vendor labelling step: re-label a random sample of each batch by a trusted
#   annotator, or cross-check each label with a model trained on trusted data, and compare the
#   disagreement rate with the batch's history. It catches wrong labels (dirty-label poisoning).
# - A scraped or user-uploaded image source: keep the provenance of every image (who, when, a hash),
#   accept data only from sources you can name, and look at statistics of new batches (duplicates,
#   near-identical corner patterns, sudden shifts in a class's share).
# A clean-label attack passes every label check (the labels are correct). Only the provenance checks
# and the image statistics can catch it, and notebook 6 shows that detection on the trained model
# (activations, spectral signatures) is then needed as a second line.
