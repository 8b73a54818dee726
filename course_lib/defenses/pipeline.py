"""Defense in depth, run end to end: the lecture's chain, and the kit's detect-retrain-filter.

The lecture closes its defense section with "use multiple defenses in combination" and an
example pipeline: sanitize the data, train with differential privacy, check the trained
model with Neural Cleanse, and Fine-Prune it if a backdoor is found. Each of those stages
is measured on its own by ``python -m course_lib bench defenses`` and notebook 6;
:func:`run_lecture_chain` runs the four *as a chain* on one poisoned training set (each
stage gets what the one before it produced), so notebook 6 can show what the combination
does, stage by stage, beside what each stage does alone.

:func:`run_pipeline` runs the pipeline the measurements recommend instead, as one piece, on
one backdoored model, and measures what each stage adds:

1. **detect** poisoned training samples with a sample detector (Activation Clustering with
   the trusted-share analysis by default: the detector the detection matrix found most
   reliable, :mod:`.activation_clustering`);
2. **remove** the flagged samples and 3. **retrain** a fresh model without them (the
   mitigation of Chen et al. and Tran et al., :mod:`.retraining`);
4. **verify at run time**: put the retrained model behind a STRIP filter (Gao et al. 2019,
   :mod:`.strip`) fitted on the defender's clean images, which rejects inputs whose
   prediction survives blending. What the detector missed, the filter may still catch; its
   price is the clean inputs it rejects (FRR).

The detection and retraining are exactly the detector's runner
(:func:`.compare.run_defense`), so the pipeline's first stages are the same numbers as the
detector's row in the comparison, and with ``cache_dir`` they are the same computation
(loaded, not repeated). ``python -m course_lib bench pipeline`` and notebook 6 both call
:func:`run_pipeline`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from dataclasses import replace

import torch

from ..cache import cached
from ..checks import check_choice
from ..models import model_for
from .compare import CODE, SAMPLE_DETECTORS, Case, dp_training_data, run_defense, setup_cases, strip_filter
from .sanitization import lecture_transform_sanitize


def run_pipeline(case: Case, *, detector: str = "activation_clustering", cache_dir=None) -> tuple[dict, dict]:
    """Detect -> remove -> retrain -> STRIP at run time, on the backdoored ``case``.

    Returns a row and the objects behind it, ``{"detection": result, "repaired": model,
    "strip": detector}``. The row holds the detection's ``tpr``, ``fpr``, ``f1`` and
    ``flagged_samples``; clean accuracy and ASR of the backdoored model (``ca_before``,
    ``asr_before``), of the retrained one (``ca_retrained``, ``asr_retrained``) and of the
    retrained one behind the filter (``ca_filtered``, ``asr_filtered``: a rejected input
    counts as not classified); the filter's ``frr`` and ``far``; the seconds of each stage
    (``seconds_retrain``: detection, removal and retraining; ``seconds_strip``) and their
    sum ``seconds``; ``cached``: whether every stage came from ``cache_dir``, and
    ``cached_retrain`` / ``cached_strip``: whether the first stages (the detector's runner, on
    the backdoored model only) / the filter did (:mod:`course_lib.cache`; a loaded stage's seconds are
    those measured when it was computed).
    """
    if not isinstance(case, Case):
        raise TypeError(f"case must be a compare.Case, got {type(case).__name__}")
    if not case.backdoored:
        raise ValueError("case must be a backdoored model (trigger and target given): the pipeline measures "
                         "what it removes")
    check_choice("detector", detector, SAMPLE_DETECTORS)
    first, results = run_defense(detector, case, cache_dir=cache_dir)
    repaired = results["repaired"]

    def verify():
        start = time.perf_counter()
        strip, measured = strip_filter(case, repaired)
        return strip, measured, round(time.perf_counter() - start, 1)

    (strip, measured, strip_seconds), hit = cached(cache_dir, "pipeline_strip", verify,
                                                   inputs={"case": case, "repaired": repaired}, code=CODE)
    ca_filtered, asr_filtered = measured["after"]
    row = {"pipeline": f"{detector} -> remove -> retrain -> strip", "detector": detector,
           **{k: first[k] for k in ("tpr", "fpr", "f1", "flagged", "flagged_samples", "ca_before", "asr_before")},
           "ca_retrained": first["ca_after"], "asr_retrained": first["asr_after"],
           "ca_filtered": ca_filtered, "asr_filtered": asr_filtered, "frr": measured["frr"], "far": measured["far"],
           "seconds_retrain": first["seconds"], "seconds_strip": strip_seconds,
           "seconds": round(first["seconds"] + strip_seconds, 1),
           "cached_retrain": bool(cache_dir is not None and first.get("cached")),
           "cached_strip": bool(cache_dir is not None and hit),
           "cached": bool(cache_dir is not None and first.get("cached") and hit)}
    return row, {"detection": results["backdoored"], "repaired": repaired, "strip": strip}


def run_lecture_chain(case: Case, *, cache_dir=None) -> tuple[dict, dict]:
    """The lecture's recommended pipeline, as a chain, on the poisoned training set of ``case``.

    1. **sanitize**: every training image gets one of the lecture's mild transformations
       (:func:`.sanitization.lecture_transform_sanitize`);
    2. **train with DP-SGD** a fresh model on the sanitized set (Abadi et al. 2016, with the
       budget of the ``dp_sgd`` runner: the same images, epochs, noise and clipping);
    3. **detect** with Neural Cleanse (Wang et al. 2019) on that model;
    4. **fine-prune** it (Liu et al. 2018) only if Neural Cleanse flagged a label.

    Returns a row, ``(CA, ASR)`` after each stage (``ca_before``/``asr_before`` of the victim
    model of ``case``; ``ca_trained``/``asr_trained`` of the model of stages 1-2;
    ``ca_after``/``asr_after`` at the end of the chain), ``epsilon``, ``flagged`` (Neural
    Cleanse's labels), ``pruned`` (whether stage 4 ran), the seconds of each stage, and the
    objects behind it: ``{"model": the model of stages 1-2, "neural_cleanse": its result,
    "final": the model at the end}``. With ``cache_dir`` every stage is computed once.
    """
    if not isinstance(case, Case):
        raise TypeError(f"case must be a compare.Case, got {type(case).__name__}")
    if not case.backdoored:
        raise ValueError("case must be a backdoored model (trigger and target given): the chain measures "
                         "what it removes")
    sanitized = lecture_transform_sanitize(dp_training_data(case), seed=case.seed)

    def train_private():
        from .dp_sgd import train_dp_sgd  # Opacus loads only when DP-SGD runs
        start = time.perf_counter()
        result = train_dp_sgd(sanitized, epochs=1 if case.quick else case.epochs, seed=case.seed,
                              progress=case.progress)
        plain = model_for(sanitized, seed=case.seed, private=True)  # the weights without Opacus's hooks,
        plain.load_state_dict(result.model.state_dict())            # which would break the next stages
        return plain.eval(), result.epsilon, result.delta, round(time.perf_counter() - start, 1)

    (model, epsilon, delta, train_seconds), _ = cached(cache_dir, "lecture_chain_training", train_private,
                                                       inputs={"case": case}, code=CODE)
    poisoned = torch.as_tensor(case.poisoned)
    trained = replace(case, model=model, train_data=sanitized, poisoned=poisoned[poisoned < len(sanitized)],
                      _features=None, _before=None, _fingerprint=None)
    nc_row, nc = run_defense("neural_cleanse", trained, cache_dir=cache_dir)
    ca_trained, asr_trained = trained.before
    row = {"ca_before": case.before[0], "asr_before": case.before[1], "epsilon": epsilon, "delta": delta,
           "train_images": len(sanitized), "ca_trained": ca_trained, "asr_trained": asr_trained,
           "flagged": nc_row["flagged"], "target_flagged": case.target in nc_row["flagged"], "pruned": False,
           "ca_after": ca_trained, "asr_after": asr_trained, "seconds_train": train_seconds,
           "seconds_detect": nc_row["search_seconds"], "seconds_prune": 0.0}
    final = model
    if nc_row["flagged"]:
        fp_row, fp = run_defense("fine_pruning", trained, cache_dir=cache_dir)
        final = fp["repaired"]
        row.update(pruned=True, ca_after=fp_row["ca_after"], asr_after=fp_row["asr_after"],
                   seconds_prune=fp_row["seconds"])
    row["seconds"] = round(row["seconds_train"] + row["seconds_detect"] + row["seconds_prune"], 1)
    return row, {"model": model, "neural_cleanse": nc["backdoored"], "final": final}


def main(argv=None) -> int:
    """``bench pipeline [--json] [--fast] [--detector NAME]``: the pipeline on the BadNets model of
    ``bench defenses`` (same data, same model, same defender)."""
    parser = argparse.ArgumentParser(prog="python -m course_lib bench pipeline",
                                     description="Detect, remove, retrain, then STRIP at run time, on one "
                                                 "backdoored model.")
    parser.add_argument("--json", action="store_true", help="print the row as one JSON line")
    parser.add_argument("--fast", action="store_true", help="train on a 20,000-image subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detector", default="activation_clustering", choices=SAMPLE_DETECTORS)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (stderr)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    case, _, setup = setup_cases(fast=args.fast, seed=args.seed, progress=not args.no_progress)
    row, _ = run_pipeline(case, detector=args.detector)
    row["total_seconds"] = round(time.perf_counter() - start, 1)
    row["setup_seconds"] = setup["seconds"]
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        for key, value in row.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
