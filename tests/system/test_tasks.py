"""system.tasks: the task names and the class codes of a run, in the challenge's code order."""

from __future__ import annotations

import pytest

from ser_cache.system.tasks import CLASSES_8, TASKS, class_codes


def test_the_challenge_code_order_and_the_ninth_class():
    # process_labels_for_categorical.py of the baseline: Angry, Sad, Happy, Surprise, Fear, Disgust, Contempt, Neutral
    assert CLASSES_8 == ("A", "S", "H", "U", "F", "D", "C", "N")
    assert class_codes(8) == CLASSES_8
    assert class_codes(9) == CLASSES_8 + ("O",)
    assert TASKS == ("attributes", "categorical", "both")


@pytest.mark.parametrize("n", [0, 7, 10])
def test_other_class_counts_are_refused(n):
    with pytest.raises(ValueError, match=f"--classes {n}: expected 8"):
        class_codes(n)
