"""What each strategy name fixes in a recipe: the presets, as plain data.

The recipe applies a preset when it is built (``recipe.build_recipe``), below every method, so the
presets live here rather than in the method files that use them (``methods/``): each method's class
names its preset from this table, and a test checks the two agree.
"""

from __future__ import annotations

from typing import Any

NO_DISTILL: dict[str, Any] = {"distill.alpha": 0.0, "distill.hidden_weight": 0.0}

PRESETS: dict[str, dict[str, Any]] = {
    "naive": {**NO_DISTILL, "replay.ratio": 0.0},  # plain fine-tuning: the lower bound
    "replay": dict(NO_DISTILL),
    "distill": {"replay.ratio": 0.0, "distill.rows": "all"},
    "replay+distill": {},  # the recipe's own replay.* and distill.*
    "ewc": {**NO_DISTILL, "replay.ratio": 0.0},
    "joint": {**NO_DISTILL, "replay.ratio": 0.0},
}
