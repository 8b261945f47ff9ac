"""Window schedules against the tables of ALGORITHM.md §6."""

import pytest

from sliderquant.schedule import (
    build_schedule,
    check_coverage,
    describe,
    fixed,
    parse_schedule,
    visit_counts,
)


def test_l32_matches_reference_table():
    s = build_schedule(32)
    assert len(s) == 33
    assert s[:4] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert s[4:29] == [[k, k + 1] for k in range(3, 28)]
    assert s[29:] == [[28, 29, 30, 31], [29, 30, 31], [30, 31], [31]]
    slides = [r["slide"] for r in describe(s)]
    assert slides[:5] == [0, 0, 0, 3, 1] and slides[-1] is None
    assert set(slides[4:-1]) == {1}
    assert visit_counts(s, 32) == [4, 3] + [2] * 28 + [3, 4]


def test_l30_matches_reference_table():
    s = build_schedule(30)
    assert len(s) == 31
    assert s[4:27] == [[k, k + 1] for k in range(3, 26)]
    assert s[27:] == [[26, 27, 28, 29], [27, 28, 29], [28, 29], [29]]
    assert visit_counts(s, 30) == [4, 3] + [2] * 26 + [3, 4]
    kinds = [r["kind"] for r in describe(s)]
    assert kinds == ["PESW"] * 4 + ["FSSW"] * 23 + ["PCSW"] * 4


@pytest.mark.parametrize("layers", [28, 40, 48, 64, 80])
def test_common_depths_have_l_plus_one_windows(layers):
    s = build_schedule(layers)
    assert len(s) == layers + 1
    assert s[4] == [3, 4] and s[-5] == [layers - 5, layers - 4]


def test_small_models():
    assert build_schedule(8)[4:] == [[3, 4], [4, 5, 6, 7], [5, 6, 7], [6, 7], [7]]
    assert build_schedule(7)[3:5] == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert build_schedule(6)[4] == [2, 3, 4, 5]
    assert visit_counts(build_schedule(5), 5) == [4] * 5
    four = build_schedule(4)  # [0..3] would appear twice in a row: deduplicated
    assert four == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [1, 2, 3], [2, 3], [3]]
    assert build_schedule(3) == [[0], [0, 1], [0, 1, 2], [1, 2], [2]]
    assert build_schedule(1) == [[0]]


def test_separate_shallow_and_deep():
    s = build_schedule(12, shallow=2, deep=5)
    assert s[:2] == [[0], [0, 1]]
    assert s[2] == [1, 2]
    assert s[-5:] == [[7, 8, 9, 10, 11], [8, 9, 10, 11], [9, 10, 11], [10, 11], [11]]
    check_coverage(s, 12)


def test_fixed_baselines():
    assert fixed(30, 2, 1)[0] == [0, 1] and fixed(30, 2, 1)[-1] == [28, 29]
    assert len(fixed(30, 2, 1)) == 29
    assert fixed(30, 1, 1) == [[i] for i in range(30)]
    assert fixed(5, 3, 2) == [[0, 1, 2], [2, 3, 4]]


def test_invalid_schedules_are_rejected():
    with pytest.raises(ValueError, match="stride"):
        fixed(10, 2, 3)
    with pytest.raises(ValueError, match="in no window"):
        check_coverage([[0], [2]], 3)
    with pytest.raises(ValueError, match="never decrease"):
        check_coverage([[1, 2], [0, 1]], 3)


def test_parse_inclusive_ranges():
    assert parse_schedule("0-0,0-1,1-3,3", 4) == [[0], [0, 1], [1, 2, 3], [3]]
    with pytest.raises(ValueError, match="outside"):
        parse_schedule("0-4", 4)
    with pytest.raises(ValueError, match="bad window"):
        parse_schedule("a-b", 4)
