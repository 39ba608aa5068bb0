"""Git wildmatch patterns, as used by ``.gitattributes`` and ``.gitignore``.

The local Hub reads a repo's ``.gitattributes`` to decide which files are LFS (as the
Hub does) and a ``.gitignore`` (from the repo or sent with a preupload) to tell the client
which files to skip. Only the rules those files commonly use are implemented: ``*``, ``?``,
``[...]``, ``**``, anchoring by a slash, trailing ``/`` for directories, ``!`` negation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def _translate(glob: str) -> str:
    """Translate a wildmatch glob (without anchoring decisions) to a regex body."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        ch = glob[i]
        if ch == "*":
            if glob.startswith("**", i):
                before_ok = i == 0 or glob[i - 1] == "/"
                after = glob[i + 2 : i + 3]
                if before_ok and after == "/":
                    out.append("(?:.*/)?")
                    i += 3
                    continue
                if before_ok and after == "":
                    out.append(".*")
                    i += 2
                    continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            j = i + 1
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(ch))
            else:
                body = glob[i + 1 : j]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\")
                out.append(f"[{'^' if negate else ''}{body}]")
                i = j
        elif ch == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def compile_wildmatch(pattern: str) -> re.Pattern[str]:
    """Compile one pattern into a regex matched against a full repo path.

    A pattern with no slash (other than a trailing one) matches a basename at any depth;
    otherwise it is anchored at the repo root.

    Args:
        pattern: The pattern, without ``!`` and without a trailing ``/``.

    Returns:
        A compiled regex to ``fullmatch`` paths with.
    """
    anchored = "/" in pattern
    pattern = pattern.lstrip("/")
    body = _translate(pattern)
    return re.compile(body if anchored else f"(?:.*/)?{body}")


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
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
        self._rules: list[tuple[re.Pattern[str], bool]] = []
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
