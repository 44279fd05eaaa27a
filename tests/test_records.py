"""records.py stands in for dataclasses (whose import costs the listing's start-up): the same behaviour."""
import pytest

from paramtool.records import FrozenInstanceError, dataclass, field, fields, replace


@dataclass(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: list = field(default_factory=list)


@dataclass
class Box:
    name: str
    items: dict = field(default_factory=dict)


@dataclass
class LabelledBox(Box):
    label: str = "?"


def test_init_defaults_and_factories_are_per_instance():
    a, b = Point(1), Point(2, 3)
    assert (a.x, a.y, a.tags, b.y) == (1, 0, [], 3)
    assert a.tags is not Point(1).tags
    assert Box("b").items is not Box("b").items
    with pytest.raises(TypeError):
        Point()


def test_frozen_refuses_assignment_and_hashes_by_value():
    p = Point(1, 2, ())
    with pytest.raises(FrozenInstanceError):
        p.x = 3
    with pytest.raises(AttributeError):
        del p.y
    assert hash(p) == hash(Point(1, 2, ())) and {p: 1}[Point(1, 2, ())] == 1


def test_eq_repr_replace_fields():
    assert Point(1, 2) == Point(1, 2) and Point(1, 2) != Point(2, 1)
    assert Box("a") != LabelledBox("a")  # another class is never equal, as dataclasses
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=[])"
    with pytest.raises(TypeError):
        hash(Box("a"))  # mutable records are unhashable
    q = replace(Point(1, 2), y=5)
    assert q == Point(1, 5) and fields(q) == ("x", "y", "tags")
    with pytest.raises(TypeError):
        replace(q, z=1)


def test_a_base_records_fields_come_first():
    b = LabelledBox("n", {"k": 1}, "lab")
    assert fields(b) == ("name", "items", "label") and b.items == {"k": 1} and b.label == "lab"
    assert LabelledBox("n").label == "?"
