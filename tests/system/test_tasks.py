"""system.tasks: the task names and the class codes of the categorical task."""

from __future__ import annotations

import pytest

from ser_cache.system.tasks import CLASSES_8, TASKS, class_codes


def test_tasks_and_the_challenge_code_order():
    assert TASKS == ("attributes", "categorical", "both")
    assert CLASSES_8 == ("A", "S", "H", "U", "F", "D", "C", "N")


def test_class_codes_eight_nine_and_nothing_else():
    assert class_codes(8) == CLASSES_8
    assert class_codes(9) == (*CLASSES_8, "O")
    assert "X" not in class_codes(9)
    for n in (0, 7, 10):
        with pytest.raises(ValueError, match="8 or 9"):
            class_codes(n)
