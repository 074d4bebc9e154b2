"""
The key-path reader the section readers share, and L{Sources}: what
validation may know of the world outside the document.

Validation is pure: the files a document names and the environment
variables that override it are read before (L{rproxy.config.load}) and
handed in as L{Sources}; nothing here opens a file or reads
C{os.environ}.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from rproxy.config.values import brief, kind, text

__all__ = ["Sources", "Section", "MISSING"]

MISSING: Any = object()


@attrs.frozen
class Sources:
    """
    What was read before validation.

    @ivar environ: the environment variables the configuration honours
        (C{DATABASE_URL}, C{REDIS_URL}).
    @ivar files: path -> its content, or the C{strerror} of reading it,
        for every file the document names.
    """

    environ: Mapping[str, str] = attrs.field(factory=dict)
    files: Mapping[str, bytes | str] = attrs.field(factory=dict)

    def file(self, path: str) -> bytes:
        """
        The content of C{path} as read before validation.

        @raise OSError: it could not be read (or was not read at all).
        """
        content = self.files.get(path)
        if isinstance(content, bytes):
            return content
        raise OSError(content or "not read")


class Section:
    """
    A mapping being read at a key path.  Reading records which keys were
    used, so that L{finish} can report the rest as unknown.
    """

    def __init__(self, data: object, path: str, errors: list[str], sources: Sources | None = None) -> None:
        self.path = path
        self.errors = errors
        self.sources = sources if sources is not None else Sources()
        self.ok = isinstance(data, dict)
        if data is None:
            data, self.ok = {}, True
        if not self.ok:
            errors.append(f"{path or 'config'}: expected a mapping, got {kind(data)}")
            data = {}
        self.data: dict[Any, Any] = data  # type: ignore[assignment]
        self.used: set[str] = set()

    def child(self, data: object, path: str) -> Section:
        """
        A section at C{path} sharing this one's errors and sources.
        """
        return Section(data, path, self.errors, self.sources)

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.key_path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> object:
        self.used.add(key)
        return self.data.get(key, MISSING)

    def value(
        self,
        key: str,
        convert: Callable[[object], Any],
        default: object = MISSING,
    ) -> Any:
        raw = self.raw(key)
        if raw is MISSING:
            if default is MISSING:
                self.error(key, "required")
            return None if default is MISSING else default
        try:
            return convert(raw)
        except ValueError as e:
            self.error(key, str(e))
            return None if default is MISSING else default

    def nullable(self, key: str, convert: Callable[[object], Any], default: object) -> Any:
        """
        A key whose C{null} means none (no limit, no listener): C{None} for
        null, C{default} when the key is absent or its value is wrong (the
        error recorded), else the converted value.
        """
        if self.data.get(key, MISSING) is None:
            self.used.add(key)
            return None
        return self.value(key, convert, default)

    def section(self, key: str) -> Section:
        raw = self.raw(key)
        return self.child(None if raw is MISSING else raw, self.key_path(key))

    def items(self, key: str) -> list[tuple[str, object]]:
        """
        The elements of a list under C{key}, each with its path.
        """
        raw = self.raw(key)
        if raw is MISSING or raw is None:
            return []
        if not isinstance(raw, list):
            self.error(key, f"expected a list, got {kind(raw)}")
            return []
        return [(f"{self.key_path(key)}[{i}]", item) for i, item in enumerate(raw)]

    def file(self, key: str, required: bool = False, missing: str = "cannot read {path}: {why}") -> str | None:
        """
        The path under C{key}, checked against the files read before
        validation; C{missing} words the error for one that could not be
        read.
        """
        raw = self.raw(key)
        if raw is MISSING or (raw is None and not required):
            if required:
                self.error(key, "required")
            return None
        try:
            path = text(raw)
            self.sources.file(path)
        except ValueError as e:
            self.error(key, str(e))
            return None
        except OSError as e:
            self.error(key, missing.format(path=brief(path), why=e.args[0] if e.args else e))
            return None
        return path

    def finish(self) -> None:
        for key in self.data:
            if key in self.used:
                continue
            if not isinstance(key, str):
                self.errors.append(f"{self.path or 'config'}: key {brief(key)} is not a string")
                continue
            known = sorted(self.used)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(key, f"unknown key{hint}")
