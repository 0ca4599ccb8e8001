"""Documents, not just sentences: sentence splitting, HTML with its markup kept, .txt/.html/.docx files and
language detection, above the engine (translate(), the CLI and the server share it)."""
from .detect import Detection, Detector, language_name
from .document import FORMATS, Documents, HtmlPlan, Plan, TextPlan, render_all
from .markup import MarkupError

__all__ = ["Detection", "Detector", "Documents", "FORMATS", "HtmlPlan", "MarkupError", "Plan", "TextPlan",
           "language_name", "render_all"]
