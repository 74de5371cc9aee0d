"""Records: classes of named fields with defaults, equality, a hash when frozen, a repr.

This is the part of `dataclasses` we use, without its start-up cost.
`dataclasses` writes every method of every class as source text and compiles
it (about 0.5 ms a class), and importing it pulls in `inspect`: over our 29
records that was 20-35 ms of a pasta start-up budgeted at 150 ms.  Here every
record shares one generic set of methods, driven by the field names the
decorator reads from the class's annotations: nothing is compiled.  Making an
instance costs about 0.5 us more than a dataclass's generated `__init__` (1.0
against 0.46 us for TcpOptions' five fields).  The records of the data path
are made per connection at most: a SYN's TcpOptions, a SockError per ICMP
error, FlowRecords for the flow log and `pesto --flows`; none per segment.

    @record(frozen=True)
    class Point:
        x: int
        y: int = 0
        tags: tuple[str, ...] = field(default=(), compare=False)

Fields are the class's own annotations, in order (no inheritance of fields).
A field without a default may not follow one with a default.  `frozen`
instances refuse assignment (`FrozenError`, an AttributeError) and hash their
compared fields; `slots` makes a class with `__slots__` instead (no
`__dict__`).  A method the class defines itself (`__init__`, `__repr__`,
`__eq__`, `__hash__`) is kept.  `replace()` and `asdict()` work as their
`dataclasses` namesakes.
"""

from __future__ import annotations

TYPE_CHECKING = False   # typing itself costs 2 ms at start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_MISSING: Any = object()


class FrozenError(AttributeError):
    """Assignment to a field of a frozen record."""


class Field:
    """A field's default (or factory for one) and whether equality looks at it."""

    __slots__ = ("default", "default_factory", "compare")

    def __init__(self, default: Any, default_factory: Callable[[], Any] | None,
                 compare: bool) -> None:
        self.default = default
        self.default_factory = default_factory
        self.compare = compare


def field(*, default: Any = _MISSING, default_factory: Callable[[], Any] | None = None,
          compare: bool = True) -> Any:
    if default is not _MISSING and default_factory is not None:
        raise ValueError("a field has a default or a default_factory, not both")
    return Field(default, default_factory, compare)


# ---------------------------------------------------------------- shared methods


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names = cls.__record_fields__
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} positional arguments "
                        f"but {len(args)} were given")
    put = object.__setattr__
    for name, value in zip(names, args, strict=False):
        put(self, name, value)
    if len(args) < len(names):
        defaults = cls.__record_defaults__
        for name in names[len(args):]:
            if name in kwargs:
                value = kwargs.pop(name)
            elif name in defaults:
                value, factory = defaults[name]
                if factory is not None:
                    value = factory()
            else:
                raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
            put(self, name, value)
    if kwargs:
        name = next(iter(kwargs))
        what = "multiple values for argument" if name in names else \
            "an unexpected keyword argument"
        raise TypeError(f"{cls.__name__}() got {what} {name!r}")


def _compared(self: Any) -> tuple:
    return tuple([getattr(self, name) for name in type(self).__record_compared__])


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _compared(self) == _compared(other)


def _hash(self: Any) -> int:
    return hash(_compared(self))


def _repr(self: Any) -> str:
    cls = type(self)
    inner = ", ".join([f"{name}={getattr(self, name)!r}" for name in cls.__record_fields__])
    return f"{cls.__qualname__}({inner})"


def _refuse_set(self: Any, name: str, value: Any) -> None:
    raise FrozenError(f"cannot assign to field {name!r}")


def _refuse_del(self: Any, name: str) -> None:
    raise FrozenError(f"cannot delete field {name!r}")


# ---------------------------------------------------------------- the decorator


def record(cls: type | None = None, /, *, frozen: bool = False, slots: bool = False) -> Any:
    def make(cls: type) -> type:
        own = cls.__dict__
        names = tuple(own.get("__annotations__", {}))
        defaults: dict[str, tuple[Any, Callable[[], Any] | None]] = {}
        compared = []
        for name in names:
            value = own.get(name, _MISSING)
            compare = True
            if isinstance(value, Field):
                compare = value.compare
                if value.default_factory is not None:
                    defaults[name] = (None, value.default_factory)
                elif value.default is not _MISSING:
                    defaults[name] = (value.default, None)
            elif value is not _MISSING:
                defaults[name] = (value, None)
            if name not in defaults and defaults:
                raise TypeError(f"{cls.__name__}: field {name!r} without a default follows "
                                "one with a default")
            if compare:
                compared.append(name)
        if slots:
            body = {k: v for k, v in own.items()
                    if k not in names and k not in ("__dict__", "__weakref__")}
            body["__slots__"] = names
            cls = type(cls)(cls.__name__, cls.__bases__, body)
        else:
            for name in names:                  # as dataclasses: the default, if any, stays
                if isinstance(own.get(name), Field):
                    if name in defaults and defaults[name][1] is None:
                        setattr(cls, name, defaults[name][0])
                    else:
                        delattr(cls, name)
        cls.__record_fields__ = names            # type: ignore[attr-defined]
        cls.__record_defaults__ = defaults       # type: ignore[attr-defined]
        cls.__record_compared__ = tuple(compared)  # type: ignore[attr-defined]
        own = cls.__dict__
        for attr, method in (("__init__", _init), ("__repr__", _repr), ("__eq__", _eq)):
            if attr not in own:
                setattr(cls, attr, method)
        if "__hash__" not in own or own["__hash__"] is None:
            # as dataclasses: equal records hash alike when frozen; mutable ones don't hash
            cls.__hash__ = _hash if frozen else None  # type: ignore[assignment]
        if frozen:
            cls.__setattr__ = _refuse_set         # type: ignore[assignment]
            cls.__delattr__ = _refuse_del         # type: ignore[assignment]
        return cls

    return make if cls is None else make(cls)


def is_record(obj: Any) -> bool:
    return hasattr(type(obj), "__record_fields__")


def replace(obj: Any, /, **changes: Any) -> Any:
    """A copy of record `obj` with `changes` to its fields."""
    cls = type(obj)
    for name in changes:
        if name not in cls.__record_fields__:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
    values = {name: getattr(obj, name) for name in cls.__record_fields__}
    values.update(changes)
    return cls(**values)


def asdict(obj: Any) -> dict[str, Any]:
    """Record `obj` as a dict, records, lists, tuples and dicts within it converted too."""
    return {name: _plain(getattr(obj, name)) for name in type(obj).__record_fields__}


def _plain(value: Any) -> Any:
    if is_record(value):
        return asdict(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):     # a named tuple
        return type(value)(*[_plain(v) for v in value])
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value
