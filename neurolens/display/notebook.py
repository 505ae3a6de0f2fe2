"""What Jupyter shows of neurolens's answers: objects with `_repr_html_` (and `_repr_png_` where an image is
the natural form) for a unit's feature visualizations, its top dataset crops, its top texts, its activation
histogram, its NSFW evidence, a layer's flags and an SAE's quality report. The per-unit dashboard that puts
them together is in display/dashboard.py; neurolens.pipelines.handle makes them from the cache.

Pixels: every image is a Picture holding the raw pixels and the reason the blur policy
(neurolens.labels.policy, the same decisions as figures) gives for blurring it (None: shown as it is). A view
shows the blurred pixels wherever there is a reason; `.reveal()` returns a NEW view that shows the raw ones
(under a red "raw pixels" line) and leaves the original as it was. Images are embedded as data URIs (PNG),
so a saved notebook is self-contained and holds only what was shown: nothing raw that was not revealed.
Texts are escaped; styles are inline (Jupyter may drop <style> blocks of untrusted notebooks).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from ..labels.blur import maybe_blur
from .figures import tile_grid

FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:13px;color:#222"
MUTED = "color:#777"
RAW_LINE = ("<div style='background:#b00020;color:#fff;padding:2px 6px;margin:2px 0;font-weight:600'>"
            "RAW PIXELS: revealed with .reveal(); the original object stays blurred</div>")


def data_uri(image: Image.Image) -> str:
    """The image as a PNG data URI (embedded in the notebook, no file beside it)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Optional[float], digits: int = 3) -> str:
    """3 significant digits, '–' for a missing or non-finite number."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def share(value: Optional[float]) -> str:
    """A share as a whole percentage, '–' where there is none (a unit without text evidence: null)."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{100 * value:.0f}%"


def section(title: str, body: str, note: str = "") -> str:
    foot = f"<div style='{MUTED};font-size:11px;margin-top:2px'>{esc(note)}</div>" if note else ""
    return (f"<div style='margin:4px 12px 8px 0;vertical-align:top'><div style='font-weight:600;margin-bottom:3px'>"
            f"{esc(title)}</div>{body}{foot}</div>")


def missing(text: str) -> str:
    return f"<div style='{MUTED};font-style:italic'>{esc(text)}</div>"


# ------------------------------------------------------------------------------------------- pixels

@dataclass(frozen=True)
class Picture:
    """One image: raw pixels, the blur policy's reason (None: shown as it is), its blurred form, a caption."""
    raw: Image.Image = field(repr=False)
    reason: Optional[str]
    caption: str = ""
    blurred: Optional[Image.Image] = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, raw: Image.Image, reason: Optional[str], caption: str = "") -> "Picture":
        """The picture with its blurred pixels made once (labels.blur: what the policy writes to files)."""
        raw = raw.convert("RGB")
        return cls(raw, reason, caption, maybe_blur(raw, reason))

    def shown(self, revealed: bool = False) -> Image.Image:
        """Raw pixels when revealed, else blurred where there is a reason."""
        if revealed or self.reason is None:
            return self.raw
        return self.blurred if self.blurred is not None else maybe_blur(self.raw, self.reason)


class Revealable:
    """Views holding Pictures: `revealed` says whether they show raw pixels; reveal() makes a new view that does."""
    revealed: bool = False

    def reveal(self):
        """A NEW view of the same images with their raw pixels; this one stays as it is (blurred)."""
        return dataclasses.replace(self, revealed=True, **self._revealed_parts())

    def _revealed_parts(self) -> dict:
        return {}


def blur_summary(pictures: Sequence[Picture], revealed: bool) -> str:
    """'3 of 8 blurred (flagged unit: 3); .reveal() shows them raw', or what a revealed view shows."""
    reasons = [p.reason for p in pictures if p.reason is not None]
    if revealed:
        return f"{len(reasons)} of {len(pictures)} would be blurred; shown RAW"
    if not reasons:
        return f"none of {len(pictures)} blurred (the blur policy found no reason)"
    kinds: Dict[str, int] = {}
    for reason in reasons:
        kind = reason.rstrip("0123456789. ") or reason
        kinds[kind] = kinds.get(kind, 0) + 1
    why = ", ".join(f"{kind}: {count}" for kind, count in kinds.items())
    return f"{len(reasons)} of {len(pictures)} blurred ({why}); .reveal() shows them raw"


def picture_row(pictures: Sequence[Picture], revealed: bool, width: int) -> str:
    cells = []
    for picture in pictures:
        image = picture.shown(revealed)
        title = picture.caption + (f" (blurred: {picture.reason})" if picture.reason and not revealed else "")
        cells.append(f"<figure style='display:inline-block;margin:0 4px 4px 0;text-align:center'>"
                     f"<img src='{data_uri(image)}' width='{width}' height='{width}' title='{esc(title)}' "
                     f"style='display:block;image-rendering:auto;border:1px solid #ddd'/>"
                     f"<figcaption style='font-size:11px;{MUTED};max-width:{width}px;overflow:hidden;"
                     f"white-space:nowrap;text-overflow:ellipsis'>{esc(picture.caption)}</figcaption></figure>")
    return "<div>" + "".join(cells) + "</div>"


@dataclass(frozen=True)
class Gallery(Revealable):
    """Images of one unit (feature visualizations or dataset crops) as a notebook shows them."""
    title: str
    pictures: Tuple[Picture, ...]
    width: int = 128
    note: str = ""
    revealed: bool = False

    def images(self) -> List[Image.Image]:
        """The pixels as shown (blurred where the policy says so, unless revealed)."""
        return [p.shown(self.revealed) for p in self.pictures]

    def html_body(self) -> str:
        if not self.pictures:
            return missing(self.note or "no images")
        summary = blur_summary(self.pictures, self.revealed)
        note = f"{self.note} · {summary}" if self.note else summary
        raw = RAW_LINE if self.revealed else ""
        return raw + picture_row(self.pictures, self.revealed, self.width) + \
            f"<div style='{MUTED};font-size:11px'>{esc(note)}</div>"

    def _repr_html_(self) -> str:
        return f"<div style=\"{FONT}\">{section(self.title, self.html_body())}</div>"

    def _repr_png_(self) -> Optional[bytes]:
        if not self.pictures:
            return None
        tiles = [image.resize((self.width, self.width)) for image in self.images()]
        title = self.title + ("  [RAW PIXELS, revealed]" if self.revealed else "")
        return png_bytes(tile_grid(tiles, [p.caption for p in self.pictures], columns=min(8, len(tiles)),
                                   title=title))

    def __repr__(self) -> str:
        state = "revealed (raw)" if self.revealed else "blurred where the policy says"
        return f"<{type(self).__name__} {self.title!r}: {len(self.pictures)} images, {state}>"


class Visualizations(Gallery):
    """A unit's feature visualizations (one per seed), captioned with their activation."""


class Samples(Gallery):
    """A unit's top dataset images: crops centred on the cell where it fired, captioned rank and activation."""


# ------------------------------------------------------------------------------------------- tables

def table(headers: Sequence[str], rows: Sequence[Sequence[str]], highlight: Sequence[bool] = ()) -> str:
    """An HTML table; cells are HTML already (escape before)."""
    head = "".join(f"<th style='text-align:left;padding:1px 6px;border-bottom:1px solid #ccc'>{esc(h)}</th>"
                   for h in headers)
    body = []
    for index, row in enumerate(rows):
        colour = "background:#fde7ea;" if index < len(highlight) and highlight[index] else ""
        body.append(f"<tr style='{colour}'>" + "".join(f"<td style='padding:1px 6px'>{cell}</td>" for cell in row)
                    + "</tr>")
    return f"<table style='border-collapse:collapse;font-size:inherit'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def score_bar(value: float, top: float) -> str:
    width = 0 if not top or not math.isfinite(value) else max(0.0, min(100.0, 100.0 * value / top))
    return (f"<span style='display:inline-block;width:60px;background:#eee;height:8px;vertical-align:middle'>"
            f"<span style='display:block;width:{width:.0f}%;height:8px;background:#5b7fbf'></span></span>")


@dataclass(frozen=True)
class Texts:
    """A unit's top vocabulary texts: {text, score, nsfw (True/False/None)} best first."""
    rows: Tuple[dict, ...]
    title: str = "Top texts"
    note: str = ""

    def html_body(self) -> str:
        if not self.rows:
            return missing(self.note or "no text ranking")
        top = max((abs(r["score"]) for r in self.rows), default=0.0)
        cells = [[esc(i + 1), esc(r["text"]), f"{score_bar(r['score'], top)} {num(r['score'])}",
                  "NSFW" if r.get("nsfw") else ""] for i, r in enumerate(self.rows)]
        body = table(["#", "text", "cosine", ""], cells, [bool(r.get("nsfw")) for r in self.rows])
        return body + (f"<div style='{MUTED};font-size:11px'>{esc(self.note)}</div>" if self.note else "")

    def _repr_html_(self) -> str:
        return f"<div style=\"{FONT}\">{section(self.title, self.html_body())}</div>"


@dataclass(frozen=True)
class Evidence:
    """A unit's NSFW evidence from a sweep (records.sweep.unit_evidence: the rule's checks), or why there is none."""
    evidence: Optional[dict]
    title: str = "NSFW evidence"
    note: str = ""

    def html_body(self) -> str:
        if not self.evidence:
            return missing(self.note or "no sweep of this layer in the cache")
        e = self.evidence
        verdict = ("<b style='color:#b00020'>FLAGGED</b>" if e["flagged"] else "not flagged") + \
            (" · text flag" if e.get("text_flag") else "")
        rows = [[esc(c["label"]), num(c["value"]), esc(f"{c['op']} {num(c['bar'])}" if c["bar"] is not None else ""),
                 {True: "✓", False: "✗", None: ""}[c["passed"]]] for c in e["checks"]]
        body = f"<div>{verdict} · rule: {esc(e.get('rule_text', ''))}</div>" + table(["check", "value", "bar", ""], rows)
        return body + (f"<div style='{MUTED};font-size:11px'>{esc(self.note)}</div>" if self.note else "")

    def _repr_html_(self) -> str:
        return f"<div style=\"{FONT}\">{section(self.title, self.html_body())}</div>"


@dataclass(frozen=True)
class Histogram:
    """A unit's activation histogram over the scanned images: the chart geometry the web app draws
    (serve.charts.histogram_chart: bars on a log(1 + count) scale, the top-k and mean marks)."""
    chart: Optional[dict]
    title: str = "Activation histogram"
    note: str = ""

    def html_body(self) -> str:
        c = self.chart
        if not c:
            return missing(self.note or "no scan with per-image values in the cache")
        bars = "".join(f"<rect x='{b['x']:.2f}' y='{b['y']:.2f}' width='{b['w']:.2f}' height='{b['h']:.2f}' "
                       f"fill='{'#c0392b' if b['top'] else '#8aa1c8'}'><title>{esc(num(b['lo']))} to "
                       f"{esc(num(b['hi']))}: {b['count']} images</title></rect>" for b in c["bars"])
        marks = ""
        for key, colour, label in (("mean_x", "#333", "mean"), ("threshold_x", "#c0392b", "top-k start")):
            if c.get(key) is not None:
                marks += (f"<line x1='{c[key]:.2f}' x2='{c[key]:.2f}' y1='4' y2='{c['base']}' stroke='{colour}' "
                          f"stroke-dasharray='3,2'><title>{label}</title></line>")
        ticks = (f"<text x='{c['left']}' y='{c['height'] - 6}' font-size='10'>{esc(num(c['lo']))}</text>"
                 f"<text x='{c['left'] + c['plot_width']}' y='{c['height'] - 6}' font-size='10' text-anchor='end'>"
                 f"{esc(num(c['hi']))}</text>")
        svg = (f"<svg width='{c['width']}' height='{c['height']}' viewBox='0 0 {c['width']} {c['height']}' "
               f"xmlns='http://www.w3.org/2000/svg'>{bars}<line x1='{c['left']}' x2='{c['left'] + c['plot_width']}' "
               f"y1='{c['base']}' y2='{c['base']}' stroke='#999'/>{marks}{ticks}</svg>")
        note = self.note or f"{c['count']} images; images per bin on a log scale; red: the top images"
        return svg + f"<div style='{MUTED};font-size:11px'>{esc(note)}</div>"

    def _repr_html_(self) -> str:
        return f"<div style=\"{FONT}\">{section(self.title, self.html_body())}</div>"


@dataclass(frozen=True)
class LayerFlags:
    """A layer's sweep as a table: units ranked by AUC (records.sweep.SweepResult.ranking rows), flagged ones
    marked, with the label sources' lines above."""
    title: str
    rows: Tuple[dict, ...]
    lines: Tuple[str, ...] = ()
    note: str = ""

    def html_body(self) -> str:
        if not self.rows:
            return missing(self.note or "no sweep")
        cells = [[esc(r["unit"]), num(r.get("auc")), num(r.get("q"), 2), num(r.get("correlation")),
                  share(r["top_nsfw_share"]), share(r.get("text_nsfw_share")),
                  "<b>YES</b>" if r["flagged"] else ("text" if r.get("text_flag") else ""),
                  esc(" | ".join(r.get("top_texts", [])))] for r in self.rows]
        lines = "".join(f"<div style='{MUTED};font-size:11px'>{esc(line)}</div>" for line in self.lines)
        body = lines + table(["unit", "AUC", "q", "corr", "top img NSFW", "top txt NSFW", "flag", "top texts"], cells,
                             [bool(r["flagged"]) for r in self.rows])
        return body + (f"<div style='{MUTED};font-size:11px'>{esc(self.note)}</div>" if self.note else "")

    def _repr_html_(self) -> str:
        return f"<div style=\"{FONT}\">{section(self.title, self.html_body())}</div>"


QUALITY_WORDS = {"explained_variance": "explained variance (held-out)", "l0": "active features per vector (L0)",
                 "dead_share": "dead share (training)", "never_fired_share": "never fired (held-out)",
                 "embedding_cosine": "embedding cosine with the SAE spliced in", "held_out_images": "held-out images",
                 "held_out_vectors": "held-out vectors", "dead_after": "dead after (vectors)"}


@dataclass(frozen=True)
class SaeQuality:
    """An SAE's quality report (neurolens.sae.quality: explained variance, L0, dead and never-fired shares,
    the embedding's cosine with the SAE spliced in) and what it is."""
    title: str
    report: Optional[dict]
    about: Tuple[Tuple[str, str], ...] = ()

    def _repr_html_(self) -> str:
        about = table(["", ""], [[esc(k), esc(v)] for k, v in self.about]) if self.about else ""
        if not self.report:
            body = about + missing("no quality report stored with this SAE (made elsewhere?)")
        else:
            rows = [[esc(QUALITY_WORDS.get(k, k)), num(v, 4) if isinstance(v, float) or v is None else esc(v)]
                    for k, v in self.report.items()]
            body = about + table(["measure", "value"], rows)
        return f"<div style=\"{FONT}\">{section(self.title, body)}</div>"
