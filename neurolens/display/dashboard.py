"""A unit at a glance in a notebook, in the spirit of Microscope's unit pages and Neuronpedia's feature
dashboards: its feature visualizations, its top dataset crops (where it fired hardest), its activation
histogram over the scanned images, its top texts and its NSFW evidence (the sweep's checks), on one card.

Built by neurolens.pipelines.handle (Handle.unit) from the cache; the parts are the views of
display/notebook.py, so the dashboard blurs exactly what they blur and `.reveal()` returns a NEW dashboard
whose images show raw pixels (the original stays blurred).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from .notebook import (FONT, MUTED, RAW_LINE, Evidence, Histogram, Revealable, Samples, Texts, Visualizations, esc,
                       section)


@dataclass(frozen=True)
class UnitDashboard(Revealable):
    """One unit's card (module docstring). `flagged`: None when no sweep of the layer is cached."""
    title: str
    unit: int
    layer: str
    flagged: Optional[bool]
    visualizations: Visualizations
    samples: Samples
    histogram: Histogram
    texts: Texts
    evidence: Evidence
    notes: Tuple[str, ...] = ()
    revealed: bool = False

    def _revealed_parts(self) -> dict:
        return {"visualizations": self.visualizations.reveal(), "samples": self.samples.reveal()}

    def _repr_html_(self) -> str:
        if self.flagged is None:
            badge = f"<span style='{MUTED}'>not swept</span>"
        elif self.flagged:
            badge = "<span style='background:#b00020;color:#fff;padding:1px 6px;border-radius:3px'>FLAGGED</span>"
        else:
            badge = "<span style='background:#e3efe3;padding:1px 6px;border-radius:3px'>not flagged</span>"
        header = (f"<div style='font-size:15px;font-weight:600;margin-bottom:4px'>{esc(self.title)} {badge}</div>"
                  + (RAW_LINE if self.revealed else ""))
        top = (f"<div style='display:flex;flex-wrap:wrap'>"
               f"{section(self.visualizations.title, self.visualizations.html_body())}"
               f"{section(self.samples.title, self.samples.html_body())}</div>")
        bottom = (f"<div style='display:flex;flex-wrap:wrap'>"
                  f"{section(self.histogram.title, self.histogram.html_body())}"
                  f"{section(self.texts.title, self.texts.html_body())}"
                  f"{section(self.evidence.title, self.evidence.html_body())}</div>")
        notes = "".join(f"<div style='{MUTED};font-size:11px'>{esc(note)}</div>" for note in self.notes)
        return (f"<div style=\"{FONT};border:1px solid #ddd;border-radius:4px;padding:8px;max-width:1100px\">"
                f"{header}{top}{bottom}{notes}</div>")

    def __repr__(self) -> str:
        state = "revealed (raw)" if self.revealed else "blurred where the policy says"
        flag = {None: "not swept", True: "flagged", False: "not flagged"}[self.flagged]
        return f"<UnitDashboard {self.title!r}: {flag}, {state}>"

    def reveal(self) -> "UnitDashboard":
        """A NEW dashboard whose images show raw pixels; this one stays blurred."""
        return replace(self, revealed=True, **self._revealed_parts())
