"""A name -> factory registry, one per kind of thing (data sets, triggers, ...)."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from cba.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register `obj` under `name`; a class also gets `name` as its `name` attribute, so
        the name is spelled once, here."""
        def decorate(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.name = name
            return obj

        return decorate

    def get(self, name: str, key: str | None = None) -> T:
        """Look up `name`; `key` is the params key to blame in the error."""
        if name not in self._entries:
            raise ConfigError(key or self.kind, name, f"choose one of {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
