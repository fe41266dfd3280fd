"""The result of captioning one image; torch-free, shared by the PyTorch and ONNX captioners."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CaptionResult:
    """The caption of one image, or the error that kept it from being captioned."""

    image: str
    caption: str | None = None
    score: float | None = None       # length-normalised log-probability of the caption
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # other beams, best first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = {"image": self.image, "caption": self.caption, "score": self.score}
        if self.alternatives:
            d["alternatives"] = [{"caption": c, "score": s} for c, s in self.alternatives]
        if self.error:
            d["error"] = self.error
        return d
