"""The tasks a run can learn and the emotion classes of the categorical task (the challenge's Task 1).

`attributes`: arousal, valence and dominance (Task 2, CCC); `categorical`: one class per utterance
(Task 1, macro-F1); `both`: the two on one shared body, as the authors' joint models.
The class codes are the corpus's EmoClass codes in the challenge's order; 9 classes add O (Other),
the layout of the authors' released categorical models. X (no agreement) is never a class.
"""

from __future__ import annotations

TASKS = ("attributes", "categorical", "both")
CLASSES_8 = ("A", "S", "H", "U", "F", "D", "C", "N")


def class_codes(n_classes: int) -> tuple[str, ...]:
    """The class codes of a run with `n_classes` classes: the eight of Task 1, or those and O."""
    if n_classes == 8:
        return CLASSES_8
    if n_classes == 9:
        return CLASSES_8 + ("O",)
    raise ValueError(f"classes: expected 8 or 9, got {n_classes}")
