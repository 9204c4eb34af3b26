"""An ipywidgets explorer over a gate recording and its images, with a static fallback.

Pick a prompt, a step (or the mean over steps), a layer kind and a site: the sites x experts
heatmap, the site's steps x experts heatmap, the routing map over the image and the image itself
update together. Where widgets cannot render (papermill / nbconvert runs, plain Python, a
terminal) :func:`explore` shows the same figures as static plots instead. Below the live widget
stands a static snapshot of its view (one image naming the control values it shows), so a
notebook saved and reopened, or read in a static viewer, shows a view rather than a lone
"model not found". The snapshot is redrawn on every change through ``update_display_data``;
JupyterLab 4 does not route that message from a widget callback, so there it keeps the view the
cell started with (its caption says which).

Example::

    rec = record_gates(pipe, prompts, steps=8, spatial=True)
    explore(rec)                          # last line of a notebook cell
    explore(rec, static=True)             # figures only
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib.pyplot as plt

from segmoe_lab.observe import plots

ALL_KINDS = "all kinds"
MEAN = "mean over steps"  # the step dropdown's first option; its value is MEAN_VALUE
MEAN_VALUE = "mean"  # a real option value: ipywidgets shows a None value as nothing selected
STATIC_ENV = "SEGMOE_LAB_STATIC"  # "1": always static plots; "0": always widgets


def is_interactive() -> bool:
    """Whether widgets will render: a Jupyter kernel serving a live frontend.

    Not interactive: no IPython, a terminal IPython, or a kernel whose current request may not
    read stdin (papermill and ``nbconvert --execute`` run cells with ``allow_stdin=False``;
    JupyterLab, Notebook, VS Code and Colab allow it). ``SEGMOE_LAB_STATIC=1`` / ``0`` overrides.
    """
    forced = os.environ.get(STATIC_ENV)
    if forced in ("0", "1"):
        return forced == "0"
    try:
        from ipykernel.zmqshell import ZMQInteractiveShell
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if not isinstance(shell, ZMQInteractiveShell):
        return False
    kernel = getattr(shell, "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", True))


def _display(*objs) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None:
        display(*objs)


class GateExplorer:
    """Controls, figures and their layout over one :class:`~segmoe_lab.observe.recording.GateRecording`.

    Attributes:
        controls (`dict`): ``prompt``, ``step``, ``kind``, ``site`` and ``value`` widgets.
        figures (`dict`): the current ``heatmap``, ``steps``, ``map`` (or None without spatial
            data) and ``image`` figures; replaced on every update.
        widget: the ipywidgets ``VBox`` to display.
        updates (`int`): how many times the figures were redrawn.
    """

    def __init__(self, recording, images: Optional[Sequence] = None, prompt: int = 0, site: Optional[str] = None):
        import ipywidgets as w

        self.rec = recording
        self.frame = plots.conditional(recording.frame())
        self.images = list(images) if images is not None else list(recording.images)
        prompts = self.frame.drop_duplicates("prompt_index").sort_values("prompt_index")
        steps = sorted(self.frame.step.unique())
        kinds = [k for k in self.frame.kind.cat.categories if k in set(self.frame.kind.unique())]
        layout = w.Layout(width="auto")
        self.controls = {
            "prompt": w.Dropdown(options=[(plots.shorten(f"{i}: {p}", 60), int(i))
                                          for i, p in zip(prompts.prompt_index, prompts.prompt)],
                                 value=prompt, description="prompt", layout=layout),
            "step": w.Dropdown(options=[(MEAN, MEAN_VALUE)] + [(str(s), int(s)) for s in steps], value=MEAN_VALUE,
                               description="step"),
            "kind": w.Dropdown(options=[ALL_KINDS] + kinds, value=ALL_KINDS, description="layer kind"),
            "site": w.Dropdown(options=self._site_options(ALL_KINDS), value=self._site_options(ALL_KINDS)[0],
                               description="site"),
            "value": w.Dropdown(options=list(plots.VALUES), value="prob_mean", description="value"),
        }
        if site is not None:
            self.controls["site"].value = plots.site_label(self.frame, site)
        self._out = {name: w.Output() for name in ("heatmap", "steps", "map", "image")}
        self.figures: dict = {}
        self.updates = 0
        self._quiet = False
        self._snapshot = None  # the display handle of the static snapshot, once displayed
        for name, control in self.controls.items():
            control.observe(self._on_change, names="value")
        self.widget = w.VBox([
            w.HBox([self.controls["prompt"], self.controls["step"]]),
            w.HBox([self.controls["kind"], self.controls["site"], self.controls["value"]]),
            w.HBox([self._out["heatmap"], w.VBox([self._out["image"], self._out["map"]]), self._out["steps"]]),
        ])
        self.update()

    def _site_options(self, kind: str) -> list[str]:
        frame = self.frame if kind == ALL_KINDS else self.frame[self.frame.kind == kind]
        labels = plots.site_labels(frame)
        if kind == ALL_KINDS and self.rec.spatial_enabled:  # routing maps need image tokens: offer those first
            spatial = {s.label for s in self.rec.spatial_sites}
            labels = [lab for lab in labels if lab in spatial] + [lab for lab in labels if lab not in spatial]
        return labels

    def _on_change(self, change) -> None:
        if self._quiet:
            return
        if change["owner"] is self.controls["kind"]:  # the site list follows the kind
            site = self.controls["site"]
            options = self._site_options(change["new"])
            self._quiet = True
            try:
                site.options = options
                site.value = site.value if site.value in options else options[0]
            finally:
                self._quiet = False
        self.update()

    def build_figures(self) -> dict:
        """The figures for the current control values (not displayed)."""
        c = {name: control.value for name, control in self.controls.items()}
        c["step"] = None if c["step"] == MEAN_VALUE else c["step"]
        kind = None if c["kind"] == ALL_KINDS else c["kind"]
        figs = {"heatmap": plots.site_heatmap(self.frame, c["prompt"], step=c["step"], value=c["value"], kind=kind),
                "steps": plots.step_heatmap(self.frame, c["site"], c["prompt"], value=c["value"]),
                "map": None, "image": None}
        site = self.rec.site(c["site"])
        if self.rec.spatial_enabled and site in self.rec.spatial_sites:
            step = -1 if c["step"] is None else c["step"]
            image = self.images[c["prompt"]] if 0 <= c["prompt"] < len(self.images) else None
            figs["map"] = plots.routing_map(self.rec, c["site"], prompt=c["prompt"], step=step, image=image)
        if 0 <= c["prompt"] < len(self.images):
            fig, ax = plt.subplots(figsize=(3.0, 3.0))
            ax.imshow(self.images[c["prompt"]])
            ax.set_axis_off()
            text = self.frame.loc[self.frame.prompt_index == c["prompt"], "prompt"].iloc[0]
            ax.set_title(plots.shorten(str(text), 40), fontsize=8)
            figs["image"] = fig
        for fig in figs.values():
            if fig is not None:
                plt.close(fig)  # shown through the Output widgets only, not by the inline backend
        return figs

    def update(self) -> None:
        """Redraw every panel from the current control values, and the static snapshot beside them."""
        from IPython.display import display

        self.figures = self.build_figures()
        self.updates += 1
        for name, out in self._out.items():
            out.clear_output(wait=True)
            fig = self.figures[name]
            with out:
                if fig is not None:
                    display(fig)
                elif name == "map":
                    print("no routing map: pick a site with image tokens, or record with spatial=True")
        if self._snapshot is not None:
            self._snapshot.update(self.snapshot())

    def snapshot(self):
        """The current view as one static image (heatmap, image, routing map, steps side by side)."""
        from IPython.display import Image

        return Image(data=snapshot_png(self.figures, _describe(self.controls)), format="png")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
        self._snapshot = display(self.snapshot(), display_id=True)  # stays in the saved notebook


def _describe(controls: dict) -> str:
    values = {name: c.label if hasattr(c, "label") and c.label is not None else c.value for name, c in controls.items()}
    return ("Static view of the explorer, for static viewers and reopened notebooks (the live widget is above): "
            f"{'; '.join(f'{k} = {v}' for k, v in values.items())}")


def snapshot_png(figures: dict, caption: str = "", dpi: int = 60) -> bytes:
    """The explorer's panels (``heatmap``, ``image``, ``map``, ``steps``; None ones skipped) side by
    side in one PNG under ``caption``, tops aligned."""
    import io
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    panels = []
    for name in ("heatmap", "image", "map", "steps"):
        fig = figures.get(name)
        if fig is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
            panels.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    font = ImageFont.load_default(size=12)
    lines = textwrap.wrap(caption, max(40, sum(p.width for p in panels) // 7)) if caption else []
    head = 16 * len(lines) + (8 if lines else 0)
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 10 * len(panels), head + max(p.height for p in panels)), "white")
    ImageDraw.Draw(canvas).multiline_text((6, 4), "\n".join(lines), fill="dimgray", font=font, spacing=4)
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, head))
        x += panel.width + 10
    out = io.BytesIO()
    canvas.save(out, format="png", optimize=True)
    return out.getvalue()


def static_figures(recording, images: Optional[Sequence] = None, prompts: Optional[Sequence[int]] = None,
                   sites: Optional[Sequence[str]] = None) -> dict:
    """What the explorer shows, as static figures: per prompt the sites x experts heatmap, and for a
    few sites the steps x experts heatmap and (with spatial data) routing maps over the images."""
    frame = plots.conditional(recording.frame())
    prompts = list(prompts) if prompts is not None else sorted(frame.prompt_index.unique())[:4]
    sites = list(sites) if sites is not None else plots.spread_sites(recording, 3, spatial=recording.spatial_enabled)
    figs = {f"heatmap {p}": plots.site_heatmap(frame, p) for p in prompts}
    figs.update({f"steps {s}": plots.step_heatmap(frame, s, prompts[0]) for s in sites[:1]})
    if recording.spatial_enabled:
        figs["routing maps"] = plots.routing_maps(recording, prompts, sites, images=images)
    return StaticFigures(figs)


class StaticFigures(dict):
    """``{name: Figure}`` of a static explorer; already displayed, so it shows nothing more in a notebook."""

    def _ipython_display_(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"StaticFigures({list(self)})"


def explore(recording, images: Optional[Sequence] = None, static: Optional[bool] = None, **initial):
    """The gate explorer, or its static figures where widgets do not render.

    Args:
        recording (`GateRecording`): from :func:`~segmoe_lab.observe.recording.record_gates` (``spatial=True``
            for routing maps).
        images (`list`, *optional*): one image per prompt (default: ``recording.images``).
        static (`bool`, *optional*): force static figures (True) or the widget (False); by default
            static when :func:`is_interactive` says widgets will not render.
        initial: ``prompt=`` / ``site=`` to start from.

    Returns:
        :class:`GateExplorer` (displays as its widget) or, static, :class:`StaticFigures` (already shown).
    """
    if static is None:
        static = not is_interactive()
    if not static:
        return GateExplorer(recording, images, **initial)
    figs = static_figures(recording, images)
    for fig in figs.values():
        plt.close(fig)
    _display(*figs.values())
    return figs
