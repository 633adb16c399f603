"""The deliberate-bug list of tests/mutations.py still applies to the code, and (slow) every
mutation on it is caught by the tests named for it."""

import pytest

from tests.mutations import MUTATIONS, check_applies, main


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_every_mutation_snippet_occurs_once(mutation):
    check_applies(mutation)


def test_the_list_is_not_empty_and_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) >= 12 and len(set(names)) == len(names)


@pytest.mark.slow
def test_every_mutation_is_caught():
    assert main([]) == 0
