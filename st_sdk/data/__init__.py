"""Files shipped inside the package: a small SmallThinker trained on Python's own documentation
(`tools/train_smallthinker.py` made it), held-out text to evaluate it on, and the routing statistics
measured on it. See README.md here and docs/trained_model.md.

`resolve_model("demo")` / `resolve_text("demo")` turn the name `demo` into these files' paths; any
other value is returned unchanged (a path).
"""
from __future__ import annotations

from pathlib import Path

NAME = "smallthinker-docs"
DIR = Path(__file__).resolve().parent
#: the shipped checkpoint (GGUF: configuration, weights, tokenizer and chat template in one file)
MODEL = DIR / f"{NAME}-q8_0.gguf"
#: held-out text (documentation the model and its tokenizer never saw), PSF licence
HELDOUT_TEXT = DIR / f"{NAME}-heldout.txt"
#: per-layer expert shares and ReGLU zero fractions measured on HELDOUT_TEXT (`st-sdk perplexity --routing-stats`)
ROUTING_STATS = DIR / f"{NAME}-routing.json"


def _shipped(path: Path, what: str) -> Path:
    if not path.is_file():
        from ..errors import WeightError

        raise WeightError(f"{path}: the shipped {what} is missing from this installation of st-sdk "
                          "(reinstall the package, or rebuild it with tools/train_smallthinker.py --ship)")
    return path


def resolve_model(arg) -> Path | str:
    """'demo' -> the shipped checkpoint; anything else unchanged."""
    return _shipped(MODEL, "model") if str(arg) == "demo" else arg


def resolve_text(arg) -> Path | str:
    """'demo' -> the shipped held-out text; anything else unchanged."""
    return _shipped(HELDOUT_TEXT, "evaluation text") if str(arg) == "demo" else arg


def routing_stats_path() -> Path:
    return _shipped(ROUTING_STATS, "routing statistics")
