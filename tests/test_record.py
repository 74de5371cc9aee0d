"""common.record: the records our configuration and parsed packets are made of."""

from __future__ import annotations

from collections import namedtuple

import pytest

from common.record import FrozenError, asdict, field, record, replace


@record(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = field(default=(), compare=False)
    seen: list[int] = field(default_factory=list, compare=False)


@record(slots=True)
class Header:
    kind: int
    body: bytes = b""


@record(frozen=True, slots=True)
class Pair:
    left: int
    right: int


@record
class Own:
    a: int

    def __repr__(self) -> str:
        return f"<own {self.a}>"


def test_positional_keyword_and_defaults():
    p = Point(1, y=2)
    assert (p.x, p.y, p.tags, p.seen) == (1, 2, (), [])
    assert Point(x=5).y == 0


def test_a_default_factory_gives_each_instance_its_own():
    a, b = Point(1), Point(1)
    a.seen.append(1)
    assert b.seen == []


@pytest.mark.parametrize("call", [lambda: Point(), lambda: Point(1, 2, (), [], 9),
                                  lambda: Point(1, z=3), lambda: Point(1, x=1)])
def test_bad_arguments_are_type_errors(call):
    with pytest.raises(TypeError):
        call()


def test_frozen_refuses_assignment_and_deletion():
    p = Point(1)
    with pytest.raises(FrozenError):
        p.x = 2
    with pytest.raises(AttributeError):
        del p.y
    assert p.x == 1


def test_equality_and_hash_follow_the_compared_fields():
    assert Point(1, 2, ("a",)) == Point(1, 2, ("b",))
    assert hash(Point(1, 2, ("a",))) == hash(Point(1, 2, ("b",)))
    assert Point(1, 2) != Point(1, 3)
    assert Point(1) != (1, 0)
    assert len({Point(1), Point(1), Point(2)}) == 2


def test_mutable_records_do_not_hash():
    with pytest.raises(TypeError):
        hash(Header(1))


def test_slots_mean_no_dict_and_fields_still_assignable():
    h = Header(4)
    h.body = b"x"
    assert (h.kind, h.body) == (4, b"x")
    assert not hasattr(h, "__dict__")
    with pytest.raises(AttributeError):
        h.other = 1                       # type: ignore[attr-defined]


def test_frozen_slots():
    p = Pair(1, 2)
    assert not hasattr(p, "__dict__")
    with pytest.raises(FrozenError):
        p.left = 3
    assert {p: 1}[Pair(1, 2)] == 1


def test_repr_names_every_field_and_a_class_s_own_repr_wins():
    assert repr(Header(1, b"a")) == "Header(kind=1, body=b'a')"
    assert repr(Own(3)) == "<own 3>"


def test_replace_makes_a_changed_copy():
    p = Point(1, 2, ("t",))
    q = replace(p, y=7)
    assert (q.x, q.y, q.tags) == (1, 7, ("t",)) and p.y == 2
    with pytest.raises(TypeError):
        replace(p, z=1)


def test_asdict_converts_what_is_inside_too():
    NT = namedtuple("NT", "a b")
    assert asdict(Point(1, 2, ("t",), [3])) == {"x": 1, "y": 2, "tags": ("t",), "seen": [3]}

    @record
    class Outer:
        inner: Pair
        many: list[Pair]
        named: NT
        by_key: dict[str, Pair]

    out = asdict(Outer(Pair(1, 2), [Pair(3, 4)], NT(Pair(5, 6), 7), {"k": Pair(8, 9)}))
    assert out == {"inner": {"left": 1, "right": 2}, "many": [{"left": 3, "right": 4}],
                   "named": NT({"left": 5, "right": 6}, 7),
                   "by_key": {"k": {"left": 8, "right": 9}}}


def test_a_field_without_default_after_one_with_is_refused():
    with pytest.raises(TypeError):
        @record
        class Bad:
            a: int = 0
            b: int
