"""Interactive explorers for the lecture (ipywidgets): move a slider, see the backdoor react.

- :class:`TriggerExplorer`: pick a trigger family, its size, place and opacity; see the
  clean image, the triggered image and their difference, the stealth numbers (L2, PSNR,
  windowed SSIM, from :func:`course_lib.metrics.stealth`) and what a model predicts.
- :class:`RateExplorer`: slide through poisoning rates of models trained beforehand (e.g.
  with :func:`course_lib.lecture.rate_sweep`) and see clean accuracy, ASR and the
  predictions on a few triggered test images. Nothing is trained on a slider move, so it
  answers at once in front of a class.

Both are displayed by ending a cell with the explorer object. That shows two outputs:
the live widget (JupyterLab, or any front end with the ipywidgets manager) and, below it,
a snapshot of its starting state: a picture and its numbers as plain HTML. A widget
cannot carry its own fallback into an exported file: nbconvert's HTML export renders the
widget's output as a widget view only (nothing, without its JavaScript from a CDN), so
the snapshot is a separate output that every export and notebook viewer keeps.
"""
from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable, Mapping

import ipywidgets as w
import numpy as np
import torch
from IPython.display import HTML, display
from PIL import Image

from .metrics import stealth
from .train import predict_logits
from .triggers import (LOCATIONS, BlendTrigger, BlurTrigger, BrightnessTrigger, DistributedTrigger,
                       DynamicTrigger, PatchTrigger, SampleSpecificTrigger, SIGTrigger, WaNetTrigger)

#: Trigger families of the explorer: name -> (builder(size, location), uses size, uses location).
#: The opacity slider then mixes the triggered image into the clean one, for every family.
TRIGGER_KINDS: dict[str, tuple[Callable, bool, bool]] = {
    "patch (checkerboard)": (lambda s, loc: PatchTrigger(s, "checkerboard", loc), True, True),
    "patch (white square)": (lambda s, loc: PatchTrigger(s, "solid", loc), True, True),
    "blend (noise)": (lambda s, loc: BlendTrigger(alpha=1.0), False, False),
    "SIG (sine wave)": (lambda s, loc: SIGTrigger(delta=0.2), False, False),
    "WaNet (warp)": (lambda s, loc: WaNetTrigger(strength=1.0), False, False),
    "brightness x1.3": (lambda s, loc: BrightnessTrigger(1.3), False, False),
    "blur": (lambda s, loc: BlurTrigger(), False, False),
    "dynamic": (lambda s, loc: DynamicTrigger(s, loc), True, True),
    "distributed (4 corners)": (lambda s, loc: DistributedTrigger(patch_size=s), True, False),
    "sample-specific": (lambda s, loc: SampleSpecificTrigger(size=s, location=loc), True, True),
}


def blend_in(clean: torch.Tensor, triggered: torch.Tensor, opacity: float) -> torch.Tensor:
    """``(1 - opacity) * clean + opacity * triggered``: a half-transparent trigger.

    For the blend family this is exactly Chen et al.'s (2017) blend with ``alpha = opacity``.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity!r}")
    return torch.lerp(clean, triggered, opacity)


class TriggerExplorer:
    """Sliders for a trigger on one test image, with live stealth numbers and a model's prediction.

    Args:
        images: (N, C, H, W) images in [0, 1] to choose from (a handful is enough).
        model: optional classifier; its prediction on the triggered image is shown.
        classes: class names for the predictions (default: the class indices).
        target: optional target class of ``model``'s backdoor, highlighted when predicted.
        kind, size, location, opacity, index: the initial state.
        scale: how many screen pixels per image pixel.
    """

    def __init__(self, images: torch.Tensor, model: torch.nn.Module | None = None, *, classes=None,
                 target: int | None = None, kind: str = "patch (checkerboard)", size: int = 3,
                 location: str = "bottom-right", opacity: float = 1.0, index: int = 0, scale: int = 6):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
            raise ValueError("images must be a non-empty (N, C, H, W) tensor")
        if kind not in TRIGGER_KINDS:
            raise ValueError(f"kind must be one of {list(TRIGGER_KINDS)}, got {kind!r}")
        if location not in LOCATIONS:
            raise ValueError(f"location must be one of {LOCATIONS}, got {location!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.images = images.detach().cpu()
        self.model = model
        self.classes = tuple(classes) if classes is not None else None
        self.target = target
        self.scale = scale
        side = min(self.images.shape[-2:])
        self.kind = w.Dropdown(options=list(TRIGGER_KINDS), value=kind, description="trigger")
        self.size = w.IntSlider(value=size, min=1, max=max(2, side // 3), description="size (px)")
        self.location = w.Dropdown(options=list(LOCATIONS), value=location, description="location")
        self.opacity = w.FloatSlider(value=opacity, min=0.0, max=1.0, step=0.05, description="opacity α",
                                     readout_format=".2f")
        self.index = w.IntSlider(value=index, min=0, max=len(self.images) - 1, description="image")
        self.picture = w.Image(format="png")
        self.readout = w.HTML()
        self.readout.add_class("trigger-explorer-readout")
        for control in (self.kind, self.size, self.location, self.opacity, self.index):
            control.observe(self._refresh, names="value")
        controls = w.VBox([self.kind, self.size, self.location, self.opacity, self.index])
        self.widget = w.VBox([w.HBox([controls, self.picture]), self.readout])
        self.widget.add_class("trigger-explorer")
        self.state: dict = {}
        self._refresh()

    def triggered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current (clean, triggered) image pair, each (C, H, W)."""
        build, _, _ = TRIGGER_KINDS[self.kind.value]
        clean = self.images[self.index.value]
        trigger = build(self.size.value, self.location.value)
        return clean, blend_in(clean, trigger(clean), self.opacity.value)

    def set(self, **values) -> dict:
        """Move controls from code (e.g. ``set(opacity=0.3)``) and return the new :attr:`state`."""
        for name, value in values.items():
            if name not in ("kind", "size", "location", "opacity", "index"):
                raise ValueError(f"set() takes kind, size, location, opacity or index, got {name!r}")
            getattr(self, name).value = value
        return self.state

    def _refresh(self, _change=None) -> None:
        _, uses_size, uses_location = TRIGGER_KINDS[self.kind.value]
        self.size.disabled, self.location.disabled = not uses_size, not uses_location
        try:
            clean, triggered = self.triggered()
        except ValueError as err:  # e.g. four corner squares that do not fit the image
            self.readout.value = f"<b>cannot apply this trigger:</b> {html.escape(str(err))}"
            self.state = {"error": str(err)}
            return
        numbers = {k: v.item() for k, v in stealth(clean, triggered).items()}
        state = {"kind": self.kind.value, "size": self.size.value, "location": self.location.value,
                 "opacity": self.opacity.value, "index": self.index.value, **numbers}
        if self.model is not None:
            probs = predict_logits(self.model, torch.stack([clean, triggered])).softmax(1)
            state["clean_prediction"], state["triggered_prediction"] = probs.argmax(1).tolist()
            state["triggered_confidence"] = probs[1].max().item()
        self.state = state
        self.picture.value = _panels([clean, triggered, ((triggered - clean).abs() * 4).clamp(0, 1)],
                                     self.scale)
        self.readout.value = self._describe(state)

    def _name(self, label: int) -> str:
        return self.classes[label] if self.classes else str(label)

    def _describe(self, s: dict) -> str:
        psnr = "∞ (unchanged)" if s["psnr"] == float("inf") else f"{s['psnr']:.1f} dB"
        text = (f"<b>clean | triggered | difference ×4</b><br>L2 = {s['l2']:.3f} &nbsp; "
                f"L∞ = {s['linf']:.3f} &nbsp; PSNR = {psnr} &nbsp; SSIM = {s['ssim']:.3f}")
        if "triggered_prediction" in s:
            hit = self.target is not None and s["triggered_prediction"] == self.target
            mark = " ← the backdoor's target" if hit else ""
            text += (f"<br>model: clean image → <b>{html.escape(self._name(s['clean_prediction']))}</b>, "
                     f"triggered → <b>{html.escape(self._name(s['triggered_prediction']))}</b> "
                     f"(model's probability {100 * s['triggered_confidence']:.0f}%){mark}")
        return text

    def snapshot(self) -> HTML:
        """The current state as a static picture and text (what an exported copy shows)."""
        return _snapshot("trigger explorer", [self.picture.value], self.readout.value)

    def _ipython_display_(self):
        _display_with_snapshot(self.widget, self.snapshot(), self.readout.value)


class RateExplorer:
    """Slide through models trained at different poisoning rates: CA, ASR and predictions.

    Args:
        runs: poisoning rate -> :class:`~course_lib.experiments.BackdoorRun` (trained beforehand).
        test: the test :class:`~course_lib.data.ImageDataset`.
        trigger: the trigger the models were poisoned with.
        target: the backdoor's target class.
        count: how many triggered non-target test images to show.
    """

    def __init__(self, runs: Mapping, test, trigger, target: int, *, count: int = 8, scale: int = 3):
        if not runs:
            raise ValueError("runs must map at least one poisoning rate to a trained BackdoorRun")
        self.rates = sorted(runs)
        self.runs = runs
        self.classes = test.classes
        self.target = target
        self.scale = scale
        others = (test.labels != target).nonzero().flatten()[:count]
        self.clean_images = test.images[others]
        self.triggered_images = trigger(self.clean_images)
        self.true_labels = test.labels[others].tolist()
        # Everything a slider move needs is computed now, so the slider answers at once.
        self.predictions = {r: predict_logits(runs[r].model, self.triggered_images).argmax(1).tolist()
                            for r in self.rates}
        self.slider = w.SelectionSlider(options=[(f"{100 * r:g}%", r) for r in self.rates],
                                        value=self.rates[len(self.rates) // 2], description="poison rate",
                                        continuous_update=True)
        self.curve = w.Image(format="png")
        self.strip = w.Image(format="png")
        self.readout = w.HTML()
        self.readout.add_class("rate-explorer-readout")
        self.slider.observe(self._refresh, names="value")
        self.widget = w.VBox([self.slider, self.readout, self.curve, self.strip])
        self.widget.add_class("rate-explorer")
        self._refresh()

    def set(self, rate: float) -> str:
        """Move the slider to ``rate`` (one of the trained rates) and return the readout text."""
        if rate not in self.runs:
            raise ValueError(f"rate must be one of the trained rates {self.rates}, got {rate!r}")
        self.slider.value = rate
        return self.readout.value

    def _refresh(self, _change=None) -> None:
        rate = self.slider.value
        run = self.runs[rate]
        hits = [p == self.target for p in self.predictions[rate]]
        names = [self.classes[p] for p in self.predictions[rate]]
        self.readout.value = (
            f"poisoning rate <b>{100 * rate:g}%</b> ({len(run.poison.indices):,} poisoned training images): "
            f"clean accuracy <b>{100 * run.clean_acc:.1f}%</b>, attack success rate <b>{100 * run.asr:.1f}%</b>"
            f"<br>triggered test images in the strip: {sum(hits)} of {len(hits)} sent to "
            f"'{html.escape(self.classes[self.target])}' (red frame); predictions: "
            f"{html.escape(', '.join(names))}")
        self.curve.value = self._curve_png(rate)
        self.strip.value = _panels(list(self.triggered_images), self.scale, frames=hits)

    def _curve_png(self, rate: float) -> bytes:
        from matplotlib.figure import Figure  # no pyplot figure: nothing is drawn twice in the notebook

        from .plots import percent_ticks
        fig = Figure(figsize=(5.6, 2.6), dpi=90)
        ax = fig.add_subplot()
        ax.plot(self.rates, [self.runs[r].asr for r in self.rates], marker="o", label="attack success rate")
        ax.plot(self.rates, [self.runs[r].clean_acc for r in self.rates], marker="s", label="clean accuracy")
        ax.axvline(rate, color="grey", linestyle="--", label="slider")
        percent_ticks(ax, self.rates)
        ax.set(ylim=(0, 1.02), xlabel="poisoning rate (log scale)", ylabel="share of test images")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def snapshot(self) -> HTML:
        """The current state, and every trained rate's numbers, as static pictures and text."""
        rows = "".join(f"<tr><td>{100 * r:g}%</td><td>{100 * self.runs[r].clean_acc:.1f}%</td>"
                       f"<td>{100 * self.runs[r].asr:.1f}%</td></tr>" for r in self.rates)
        table = (f"<table><tr><th>rate</th><th>clean accuracy</th><th>attack success rate</th></tr>"
                 f"{rows}</table>")
        return _snapshot("poisoning-rate explorer", [self.curve.value, self.strip.value],
                         self.readout.value + "<br>" + table)

    def _ipython_display_(self):
        _display_with_snapshot(self.widget, self.snapshot(), self.readout.value)


def _panels(images: list[torch.Tensor], scale: int, frames: list[bool] | None = None) -> bytes:
    """Images (C, H, W) side by side, enlarged ``scale`` times, as PNG bytes.

    Each image gets a 3-pixel frame: red where ``frames[i]`` is true, white otherwise.
    """
    tiles = []
    for i, image in enumerate(images):
        rgb = (image.detach().cpu().clamp(0, 1) * 255).round().byte().expand(3, -1, -1).permute(1, 2, 0).numpy()
        tile = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
        framed = np.empty((tile.shape[0] + 6, tile.shape[1] + 6, 3), dtype=np.uint8)
        framed[:] = (220, 30, 30) if frames and frames[i] else (255, 255, 255)
        framed[3:-3, 3:-3] = tile
        tiles.append(framed)
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(tiles, axis=1)).save(buf, format="PNG")
    return buf.getvalue()


def _snapshot(name: str, pngs: list[bytes], text_html: str) -> HTML:
    """Static pictures and text of an explorer's state, as an HTML output (plain text too)."""
    images = "".join(f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"/><br>' for png in pngs)
    return HTML(f'<div class="explorer-snapshot"><i>Snapshot of the {name} as it started (the live widget '
                f'above needs a running kernel; exported copies keep this picture):</i><br>{images}'
                f'<div>{text_html}</div></div>')


def _display_with_snapshot(widget: w.Widget, snapshot: HTML, text_html: str) -> None:
    """Display the live widget, with ``text_html`` as its plain-text fallback, and below it the snapshot."""
    bundle = widget._repr_mimebundle_()
    bundle["text/plain"] = _plain(text_html)
    display(bundle, raw=True)
    display(snapshot)


def _plain(text_html: str) -> str:
    """HTML reduced to readable plain text (line breaks kept, tags dropped)."""
    plain = html.unescape(text_html.replace("<br>", "\n").replace("</tr>", "\n")
                          .replace("</td>", " ").replace("</th>", " "))
    return re.sub(r"<[^>]+>", "", plain)
