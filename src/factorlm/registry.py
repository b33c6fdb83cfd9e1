"""A tiny name -> object registry, so a new method / structure / task plugs in by adding a file."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import FactorLMError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *, name_attr: str | None = None) -> Callable[[T], T]:
        """Decorator adding ``obj`` under ``name``; with ``name_attr`` it also sets ``obj.<name_attr> = name``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            if name_attr:
                setattr(obj, name_attr, name)
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise FactorLMError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
