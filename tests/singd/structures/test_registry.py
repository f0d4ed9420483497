"""Structure names: every documented form parses, anything else is one clear sentence."""

from __future__ import annotations

import pytest

from singd.structures import STRUCTURE_FORMS, STRUCTURE_NAMES, StructuredMatrix, get_structure


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_canonical_names_round_trip(name):
    cls = get_structure(name)
    assert issubclass(cls, StructuredMatrix) and cls.name == name
    assert get_structure(f" {name.upper()} ") is cls


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("block1diagonal", (1,)), ("block7diagonal", (7,)), ("block128diagonal", (128,))],
)
def test_any_block_size(name, sizes):
    cls = get_structure(name)
    assert cls.name == name and cls.block_size == sizes[0]
    assert cls.storage_entries(2 * sizes[0] + 1) == 2 * sizes[0] ** 2 + 1


def test_any_hierarchical_sizes():
    cls = get_structure("hierarchical4_9")
    assert (cls.k1, cls.k2, cls.name) == (4, 9, "hierarchical4_9")
    assert get_structure("hierarchical4_9") is cls
    assert get_structure("hierarchical9_4") is not cls


@pytest.mark.parametrize(
    "bad",
    ["", "blockdiagonal", "block0diagonal", "hierarchical15", "hier15_15", "toeplitz"],
)
def test_unknown_names_raise_one_sentence_listing_the_forms(bad):
    with pytest.raises(ValueError) as error:
        get_structure(bad)
    message = str(error.value)
    assert repr(bad) in message and message.count(". ") == 0 and message.endswith(".")
    if "0" not in bad:
        assert all(form in message for form in STRUCTURE_FORMS)


def test_non_strings_are_rejected():
    with pytest.raises(ValueError, match="Unknown structure"):
        get_structure(None)
