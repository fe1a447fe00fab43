"""The one field check: it names the field and the bad value, refuses bools, and never prints a huge value."""

import pytest

from pregate.errors import PregateError, check_int, check_number


class MyError(PregateError):
    pass


def test_check_int_returns_good_values_and_names_bad_ones():
    assert check_int("n", 3) == 3 and check_int("n", 0, 0) == 0 and check_int("n", 5, 1, 5) == 5
    for value in (0, True, 2.0, "2", None, 6):
        with pytest.raises(MyError, match=r"^n=.* must be an integer in \[1, 5\] \(why\)$"):
            check_int("n", value, 1, 5, error=MyError, why="why")


def test_check_number_bounds_and_finiteness():
    assert check_number("t", 0, minimum=0) == 0 and check_number("p", 1, above=0, maximum=1) == 1
    for value in (0, 1.5, float("nan"), float("inf"), False, "0.5"):
        with pytest.raises(PregateError, match=r"^p=.* must be a finite number > 0 and <= 1$"):
            check_number("p", value, above=0, maximum=1)


def test_a_huge_value_is_cut_in_the_message():
    with pytest.raises(PregateError) as err:
        check_int("max_tokens", 10**5000, 1, 4096)  # str() of it raises ValueError (Python's digit limit)
    assert "too large to show" in str(err.value)
    with pytest.raises(PregateError) as err:
        check_int("seed", "x" * 10_000)
    assert len(str(err.value)) < 200
