"""Git wildmatch patterns, as used by ``.gitattributes`` and ``.gitignore``.

The local Hub reads a repo's ``.gitattributes`` to decide which files are LFS (as the
Hub does) and a ``.gitignore`` (from the repo or sent with a preupload) to tell the client
which files to skip. Only the rules those files commonly use are implemented: ``*``, ``?``,
``[...]``, ``**``, anchoring by a slash, trailing ``/`` for directories, ``!`` negation.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

#: Token kinds of a compiled pattern.
_LITERAL, _ONE, _CLASS, _STAR, _ANY, _DIRS = range(6)


def _tokens(glob: str) -> list[tuple[int, object]]:
    """Split a wildmatch glob (without anchoring decisions) into tokens.

    ``**/`` (at the start or after ``/``) matches zero or more whole directories, a trailing
    ``**`` anything, ``*`` anything but ``/``, ``?`` one character but ``/``, ``[...]`` a
    character class (``!``/``^`` negate), ``\\x`` the character ``x``.
    """
    out: list[tuple[int, object]] = []
    i, n = 0, len(glob)
    while i < n:
        ch = glob[i]
        if ch == "*":
            if glob.startswith("**", i):
                before_ok = i == 0 or glob[i - 1] == "/"
                after = glob[i + 2 : i + 3]
                if before_ok and after == "/":
                    out.append((_DIRS, None))
                    i += 3
                    continue
                if before_ok and after == "":
                    out.append((_ANY, None))
                    i += 2
                    continue
            if not out or out[-1][0] != _STAR:  # ``**`` elsewhere is one ``*``
                out.append((_STAR, None))
        elif ch == "?":
            out.append((_ONE, None))
        elif ch == "[":
            j = i + 1
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append((_LITERAL, ch))
            else:
                body = glob[i + 1 : j]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\")
                try:
                    with warnings.catch_warnings():  # "possible nested set" on ``[[``: fine here
                        warnings.simplefilter("ignore", FutureWarning)
                        out.append((_CLASS, re.compile(f"[{'^' if negate else ''}{body}]")))
                except re.error:  # a malformed class (``[z-a]``) matches nothing
                    out.append((_CLASS, None))
                i = j
        elif ch == "\\" and i + 1 < n:
            i += 1
            out.append((_LITERAL, glob[i]))
        else:
            out.append((_LITERAL, ch))
        i += 1
    return out


class Wildmatch:
    """A compiled wildmatch pattern, matched against whole paths in linear time.

    The matcher follows every way of matching at once (the set of path positions reachable
    after each token), so it takes ``O(len(tokens) * len(path))`` steps whatever the pattern:
    a hostile ``.gitignore`` such as ``*a*a*a*a*b`` cannot make the server backtrack for hours,
    as a regex translation would.
    """

    def __init__(self, tokens: list[tuple[int, object]]):
        self.tokens = tokens

    def fullmatch(self, path: str) -> bool:
        """Whether the pattern matches all of ``path``."""
        n = len(path)
        slash_after = [False] * (n + 1)  # position q follows a "/"
        for q in range(1, n + 1):
            slash_after[q] = path[q - 1] == "/"
        positions = {0}
        for kind, arg in self.tokens:
            if not positions:
                return False
            if kind == _LITERAL:
                positions = {p + 1 for p in positions if p < n and path[p] == arg}
            elif kind == _ONE:
                positions = {p + 1 for p in positions if p < n and path[p] != "/"}
            elif kind == _CLASS:
                positions = {p + 1 for p in positions if p < n and arg is not None and arg.match(path[p])}
            elif kind == _STAR:  # from each start, on until the next "/"
                reached, active = set(), False
                for q in range(min(positions), n + 1):
                    if q in positions:
                        active = True
                    elif slash_after[q]:
                        active = False
                    if active:
                        reached.add(q)
                positions = reached
            elif kind == _ANY:  # as the regex ".*": anything but a newline
                reached, active = set(), False
                for q in range(min(positions), n + 1):
                    if q in positions:
                        active = True
                    elif path[q - 1] == "\n":
                        active = False
                    if active:
                        reached.add(q)
                positions = reached
            else:  # _DIRS, as the regex "(?:.*/)?": stay, or jump past any later "/"
                reached, active = set(positions), False
                for q in range(min(positions), n + 1):
                    if active and slash_after[q]:
                        reached.add(q)
                    if q in positions:
                        active = True
                    if q < n and path[q] == "\n":
                        active = False
                positions = reached
        return n in positions


def compile_wildmatch(pattern: str) -> Wildmatch:
    """Compile one pattern into a matcher for full repo paths.

    A pattern with no slash (other than a trailing one) matches a basename at any depth;
    otherwise it is anchored at the repo root.

    Args:
        pattern: The pattern, without ``!`` and without a trailing ``/``.

    Returns:
        A :class:`Wildmatch` to ``fullmatch`` paths with.
    """
    anchored = "/" in pattern
    tokens = _tokens(pattern.lstrip("/"))
    return Wildmatch(tokens if anchored else [(_DIRS, None), *tokens])


@dataclass(frozen=True)
class _Rule:
    regex: Wildmatch
    negate: bool
    dir_only: bool


class GitIgnore:
    """A parsed ``.gitignore``: ``is_ignored(path)`` follows git's last-match-wins rules."""

    def __init__(self, text: str):
        self._rules: list[_Rule] = []
        for raw in text.splitlines():
            line = raw.rstrip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:]
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            if line:
                self._rules.append(_Rule(compile_wildmatch(line), negate, dir_only))

    def _match(self, path: str, is_dir: bool) -> bool | None:
        verdict = None
        for rule in self._rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.fullmatch(path):
                verdict = not rule.negate
        return verdict

    def is_ignored(self, path: str) -> bool:
        """Whether ``path`` (a file) is ignored, directly or through an ignored parent dir.

        Args:
            path: Repo path with ``/`` separators.

        Returns:
            ``True`` if git would not track the file.
        """
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if self._match("/".join(parts[:depth]), is_dir=True):
                return True  # git cannot re-include a file inside an excluded directory
        return bool(self._match(path, is_dir=False))


class GitAttributes:
    """A parsed ``.gitattributes``, reduced to the ``filter=lfs`` attribute."""

    def __init__(self, text: str):
        self._rules: list[tuple[Wildmatch, bool]] = []
        for raw in text.splitlines():
            fields = raw.strip().split()
            if not fields or fields[0].startswith("#"):
                continue
            pattern, attrs = fields[0], fields[1:]
            lfs: bool | None = None
            for attr in attrs:
                if attr.startswith("filter="):
                    lfs = attr == "filter=lfs"
                elif attr in ("-filter", "!filter"):
                    lfs = False
            if lfs is not None and not pattern.endswith("/"):
                self._rules.append((compile_wildmatch(pattern), lfs))

    def is_lfs(self, path: str) -> bool:
        """Whether ``path`` is tracked by LFS according to these attributes (last match wins)."""
        verdict = False
        for regex, lfs in self._rules:
            if regex.fullmatch(path):
                verdict = lfs
        return verdict


#: The ``.gitattributes`` every new repo starts with, as on the Hub: common binary
#: formats go to LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gguf",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar",
        "*.tar.*",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)
