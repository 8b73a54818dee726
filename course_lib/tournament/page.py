"""The tournament's page: one static HTML file and its images, readable from disk with no network.

What it shows (docs/tournament.md): the attacks x detectors matrix as a heat map, both
leaderboards with the uncertainty of each rank, one triggered example per attack, the
model-level defenses' table, and for every student a paragraph about their own row and
column. Nothing on it is fetched: the images sit beside the page (``heatmap.png``,
``examples/*.png``), the style is inline, there is no script. Every text that comes from a
submission (none does today: names are pseudonyms or ids, reasons are the grader's own
messages) is escaped.
"""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLE = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.2em .5em;text-align:left}"
         "th{background:#eee}img{max-width:100%}.ex{display:inline-block;margin:.5em;text-align:center;"
         "font-size:.85em}.ex img{width:112px;image-rendering:pixelated}")


def heatmap(matrix: np.ndarray, rows: list[str], columns: list[str], path: Path, played=None) -> None:
    """The attacks x detectors Detection Scores as an image (errors grey and marked "err"; cells a schedule
    did not play white). A big class's map has no numbers in it (they would not fit) and is capped in size."""
    played = np.ones(np.shape(matrix), dtype=bool) if played is None else np.asarray(played, dtype=bool)
    small = len(rows) <= 60 and len(columns) <= 60
    height = min(40.0, 1.5 + (0.35 if small else 0.12) * max(1, len(rows)))
    fig, ax = plt.subplots(figsize=(min(40.0, 2.5 + (0.5 if small else 0.12) * max(1, len(columns))), height))
    ax.set_facecolor("#cccccc")
    if (~played).any():
        ax.imshow(np.where(played, np.nan, 1.0), cmap="Greys", vmin=0, vmax=100, aspect="auto")   # white: not played
    image = ax.imshow(np.ma.masked_invalid(np.where(played, matrix, np.nan)), cmap="RdYlGn", vmin=-1, vmax=1,
                      aspect="auto")
    if small:
        for (i, j), value in np.ndenumerate(matrix):
            if played[i, j]:
                ax.text(j, i, "err" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7 if small else 4)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if small else 4)
    ax.set_xlabel("detector")
    ax.set_ylabel("attack (arena)")
    fig.colorbar(image, ax=ax, label="Detection Score (TPR - FPR)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def example(pair, path: Path) -> None:
    """One clean image and the same image triggered, side by side, as a PNG."""
    images = [np.asarray(img.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()) for img in pair]
    plt.imsave(path, np.concatenate(images, axis=1), cmap="gray", vmin=0, vmax=1)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(results: dict, shown, out: Path) -> Path:
    """Write ``out/index.html`` from ``results`` (the tournament's results.json as a dict), with the
    names ``shown(name)`` gives (pseudonyms or ids); the images must already be in ``out``."""
    out = Path(out)
    show = lambda name: html.escape(shown(name))  # noqa: E731
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Tournament {html.escape(results['assignment'])}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Class tournament: {html.escape(results['assignment'])}</h1>",
             f"<p>Every entering attack was planted by the grader in a fresh model (its own arena: "
             f"{results['recipe']['train_images']} training images, {results['recipe']['rate']:.0%} poisoned, "
             f"{results['recipe']['epochs']} epochs, target class {results['target']}); every detector was run on each "
             f"arena's penultimate activations and labels and scored by the lecture's Detection Score = TPR - FPR. "
             f"Tournament seed {results['seed']}, {len(results['arenas'])} arenas, {len(results['detectors'])} "
             f"detectors, {results['code'][:12]} (code). An attack <em>evades</em> a detector whose Detection Score on "
             f"its arena is below {results['evade_bar']}.</p>",
             "<h2>Attacks x detectors</h2><img id='heatmap' src='heatmap.png' alt='heat map of detection scores'>"]
    if results.get("schedule"):
        schedule = results["schedule"]
        parts.insert(-1, f"<p>A big class's schedule: every detector met the {schedule['house_arenas']} "
                         f"house arenas and {schedule['student_arenas']} student arenas drawn at random with "
                         f"the tournament seed (white cells were not played; a mean is over the arenas met, and the "
                         f"rank intervals below are wider for it).</p>")
    house = [a for a in results["arenas"] if a["name"].startswith("house:")]
    if house:
        parts.append("<h2>House attacks</h2><p>The kit's own trigger families, each with its stated recipe, built "
                     "and judged like a student's (ASR at least 0.80; CA at most 0.10 below the same recipe without "
                     "poison). A family that did not pass is listed under <em>Not entered</em>.</p>")
        parts.append(_table(["attack", "trigger", "poisoned", "CA", "clean CA", "ASR"],
                            [[show(a["name"]), a["info"].get("trigger", ""),
                              f"{a['info']['recipe']['rate']:.0%} of {a['info']['recipe']['train_images']}",
                              _fmt(a["ca"], 3), _fmt(a.get("clean_ca"), 3), _fmt(a["asr"], 3)] for a in house]))
    parts.append("<h2>Detector leaderboard</h2><p>Mean Detection Score over the arenas (an error counts as 0); "
                 "the rank's 90% interval comes from resampling the arenas.</p>")
    parts.append(_table(["rank", "90% interval", "detector", "mean score", "errors", "worst arena", "best arena"],
                        [[r["rank"], f"{r['rank_low']}-{r['rank_high']}", shown(r["detector"]),
                          _fmt(r["mean_score"]), r["errors"], shown(r["worst"] or "-"), shown(r["best"] or "-")]
                         for r in results["detector_board"]]))
    parts.append("<h2>Attack leaderboard</h2><p>Rank 1 is the stealthiest: the lowest mean Detection Score of the "
                 "detectors against it (interval: detectors resampled). CA and ASR are the arena model's.</p>")
    stats = {a["name"]: a for a in results["arenas"]}
    parts.append(_table(["rank", "90% interval", "attack", "mean score against", "evaded", "CA", "ASR", "PSNR dB",
                         "SSIM", "caught by"],
                        [[r["rank"], f"{r['rank_low']}-{r['rank_high']}", shown(r["arena"]),
                          _fmt(r["mean_score_against"]), f"{r['evaded']} of {r['answered']}",
                          _fmt(stats[r["arena"]]["ca"], 3), _fmt(stats[r["arena"]]["asr"], 3),
                          _fmt(stats[r["arena"]]["stealth"].get("psnr"), 1),
                          _fmt(stats[r["arena"]]["stealth"].get("ssim"), 3),
                          ", ".join(shown(d) for d in r["caught_by"]) or "none"] for r in results["attack_board"]]))
    parts.append("<h2>One triggered example per attack</h2><p>Left: the grader's image; right: the same image "
                 "triggered.</p>")
    parts += [f"<div class='ex'><img src='examples/{a['file']}' alt='example of {show(a['name'])}'><br>"
              f"{show(a['name'])}</div>" for a in results["arenas"]]
    if results.get("model_defenses"):
        steps = sorted({m["nc_steps"] for m in results["model_defenses"] if "nc_steps" in m})
        parts.append("<h2>Model-level defenses</h2><p>Run by the grader on each arena's model with quick "
                     f"budgets: Neural Cleanse ({' or '.join(map(str, steps)) or 'a quick search of'} optimization "
                     "steps per label: is the target class flagged, and which clean labels are flagged too, its "
                     "false alarms?), STRIP (false acceptance rate "
                     "of triggered inputs at 1% false rejections), Fine-Pruning (ASR after, and the lecture's "
                     "Mitigation Score).</p>")
        parts.append(_table(["attack", "NC flags target", "NC false alarms", "STRIP FAR", "FP ASR after", "FP CA after",
                             "Mitigation Score", "note"],
                            [[shown(m["arena"]), m.get("nc_target_flagged", "-"),
                              (", ".join(map(str, m["nc_false_alarms"])) or "none") if "nc_false_alarms" in m else "-",
                              _fmt(m.get("strip_far")),
                              _fmt(m.get("fp_asr_after")), _fmt(m.get("fp_ca_after")),
                              _fmt(m.get("mitigation_score")), m.get("error", "")]
                             for m in results["model_defenses"]]))
    parts.append("<h2>Not entered</h2>")
    parts.append(_table(["entrant", "side", "why"], [[shown(n["name"]), n["side"], n["reason"]]
                                                      for n in results["not_entered"]]) if results["not_entered"]
                 else "<p>Every entrant entered.</p>")
    parts.append("<h2>Each student</h2>")
    parts += [f"<h3>{show(p['name'])}</h3><p>{html.escape(p['text'])}</p>" for p in results["paragraphs"]]
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
