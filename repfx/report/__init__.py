"""What a fold did, for people: ``FoldReport`` (``fold_report``), the sketch of the graph it keeps
(``sketch``) and its picture (``draw``)."""

from .fold_report import Folded, FoldReport, Skipped

__all__ = ["FoldReport", "Folded", "Skipped"]
