"""The two tasks of the IS25-SER challenge a run can learn, and the categorical task's class codes.

Task 2 is the emotional attributes (arousal, valence, dominance); Task 1 the categorical emotion,
eight classes in the challenge's code order (as `process_labels_for_categorical.py` of the
baseline lists them). Nine classes append O (Other), the layout of the authors' released models.
"""

from __future__ import annotations

TASKS = ("attributes", "categorical", "both")
CLASSES_8 = ("A", "S", "H", "U", "F", "D", "C", "N")


def class_codes(n_classes: int) -> tuple[str, ...]:
    """The class codes of a run with `n_classes` classes (8, or 9 with O), in the run's order."""
    if n_classes == 8:
        return CLASSES_8
    if n_classes == 9:
        return CLASSES_8 + ("O",)
    raise ValueError(f"--classes {n_classes}: expected 8 (the challenge's classes) or 9 (with O, Other)")
