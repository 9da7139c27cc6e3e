"""training.pairs: the LFW pairs format, on a hand-written file and on the real development pairs."""

from __future__ import annotations

from collections import Counter

import pytest

from training.pairs import Pair, lfw_image, people_in_folds, read_pairs
from training.paths import shared_data

SMALL = (
    "\n".join(
        [
            "2\t2",
            "Ann_Lee\t1\t2",
            "Bob_Ray\t3\t11",
            "Ann_Lee\t1\tBob_Ray\t2",
            "Cy_Young\t4\tDee_Dee\t1",
            "Eve_Park\t1\t2",
            "Fay_Wray\t2\t3",
            "Eve_Park\t2\tGus_Grissom\t1",
            "Hal_Holbrook\t1\tFay_Wray\t1",
        ]
    )
    + "\n"
)


def test_lfw_image_names():
    assert lfw_image("Colin_Powell", 1) == "Colin_Powell/Colin_Powell_0001.jpg"
    assert lfw_image("Colin_Powell", "23") == "Colin_Powell/Colin_Powell_0023.jpg"


def test_read_a_small_hand_written_file(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text(SMALL)
    n_folds, pairs = read_pairs(path)
    assert n_folds == 2 and len(pairs) == 8
    assert pairs[0] == Pair(0, "Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0002.jpg", True)
    assert pairs[1] == Pair(0, "Bob_Ray/Bob_Ray_0003.jpg", "Bob_Ray/Bob_Ray_0011.jpg", True)
    assert pairs[2] == Pair(0, "Ann_Lee/Ann_Lee_0001.jpg", "Bob_Ray/Bob_Ray_0002.jpg", False)
    assert pairs[7] == Pair(1, "Hal_Holbrook/Hal_Holbrook_0001.jpg", "Fay_Wray/Fay_Wray_0001.jpg", False)
    assert [p.fold for p in pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [p.same for p in pairs] == [True, True, False, False] * 2
    assert people_in_folds(pairs, {0}) == {"Ann_Lee", "Bob_Ray", "Cy_Young", "Dee_Dee"}
    assert people_in_folds(pairs, {1}) == {"Eve_Park", "Fay_Wray", "Gus_Grissom", "Hal_Holbrook"}
    assert people_in_folds(pairs, {0, 1}) == people_in_folds(pairs, {0}) | people_in_folds(pairs, {1})
    assert people_in_folds(pairs, set()) == set()


def test_windows_line_endings_and_blank_lines(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_bytes(("\n" + SMALL.replace("\n", "\r\n") + "\r\n").encode())
    _, pairs = read_pairs(path)
    assert len(pairs) == 8 and pairs[0].right == "Ann_Lee/Ann_Lee_0002.jpg"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "first line"),
        ("2 2\nAnn_Lee\t1\t2\n", "separated by a tab, not spaces"),
        ("1\t2\nAnn_Lee\t1\t2\n", "expected 4 pair lines"),
        ("1\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\n", "2 fields"),
        ("1\t1\nAnn_Lee\t1\t2\n\nAnn_Lee\t1\n", "line 4 has 2 fields"),  # numbered as the file is, blanks too
        ("0\t0\n", "first line"),
        ("x\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo\t1\n", "first line"),
        ("1\t1\nAnn_Lee\tone\t2\nAnn_Lee\t1\tBo\t1\n", "line 2: image numbers must be whole numbers"),
        ("1\t1\nAnn_Lee\t-1\t2\nAnn_Lee\t1\tBo\t1\n", "line 2: image numbers must be whole numbers from 1"),
        ("1\t1\nAnn_Lee\t1\t0\nAnn_Lee\t1\tBo\t1_0\n", "line 2: image numbers must be whole numbers from 1"),
        ("2\t1\nAnn_Lee\t1\tBo\t1\nAnn_Lee\t1\tBo\t2\nAnn_Lee\t2\tBo\t1\nAnn_Lee\t2\tBo\t2\n",
         "line 2 should be a matched pair"),  # one class only: eval printed AUC NaN and a TAR of 100 %
        ("1\t1\nAnn_Lee\t1\tBo\t1\nAnn_Lee\t1\t2\n", "line 2 should be a matched pair"),  # swapped order
    ],
)
def test_malformed_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_pairs(path)


@pytest.fixture(scope="module")
def dev_pairs():
    return read_pairs(shared_data() / "lfw" / "pairs_dev.txt")


def test_real_development_pairs(dev_pairs):
    n_folds, pairs = dev_pairs
    assert n_folds == 8 and len(pairs) == 4800
    assert sum(p.same for p in pairs) == 2400
    assert Counter(p.fold for p in pairs) == {f: 600 for f in range(8)}
    assert Counter(p.fold for p in pairs if p.same) == {f: 300 for f in range(8)}
    assert pairs[0] == Pair(
        0, "Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg", True
    )
    images = shared_data() / "lfw" / "images"
    missing = [s for p in pairs for s in (p.left, p.right) if not (images / s).is_file()]
    assert missing == []
    for p in pairs:
        assert (p.left.split("/")[0] == p.right.split("/")[0]) == p.same


def test_people_in_folds_are_disjoint_across_folds(dev_pairs):
    _, pairs = dev_pairs
    people = [people_in_folds(pairs, {f}) for f in range(8)]
    for i in range(8):
        assert len(people[i]) > 100
        for j in range(i + 1, 8):
            assert not people[i] & people[j], (i, j, sorted(people[i] & people[j])[:5])
    assert "Joseph_Biden" in people[2]  # README: Biden is in View 2 fold 3 (1-based)


def test_a_binary_file_given_as_pairs_is_named(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not text")
    with pytest.raises(ValueError, match="photo.jpg is not a pairs file: not UTF-8 text"):
        read_pairs(path)
