"""The registry mechanism every plug-in kind shares."""
import pytest

from segmoe_lab.registry import Registry


def test_lookup_of_an_unknown_name_lists_the_choices_and_the_field():
    reg = Registry("routing", "a routing policy")
    reg.add("b", 2)
    reg.add("a", 1)
    with pytest.raises(ValueError, match=r"routing: 'c' is not a routing policy; choose one of \['a', 'b'\]"):
        reg.lookup("c")


def test_a_name_registered_twice_is_refused():
    reg = Registry("init", "a gate construction")
    reg.add("x", 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("x", 2)
    assert reg.lookup("x") == 1


def test_entries_keep_registration_order():
    reg = Registry("source_model", "a kind of model source")
    for name in ("url", "local", "hub"):
        reg.add(name, name.upper())
    assert list(reg) == ["url", "local", "hub"]
