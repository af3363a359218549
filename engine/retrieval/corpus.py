"""The corpus of the retrieval index: which files of a directory are read, and how they are cut into chunks.

Selection (`scan_corpus`): inside a git checkout, exactly the files git tracks or would track
(`git ls-files --cached --others --exclude-standard`: .gitignore, .git/info/exclude and the global excludes
are honoured); elsewhere a directory walk. Either way, never a hidden file or directory (`.git`, `.venv`,
`.cache`...), never a virtualenv (a directory holding `pyvenv.cfg`) or `__pycache__`/`node_modules`,
never a file over `max_file_bytes`, and only the text types in `TEXT_SUFFIXES`/`TEXT_NAMES`. A file that
is binary (a NUL byte, or not UTF-8) is skipped and counted; a file that cannot be read is reported by path
with the reason. Nothing here writes anything.

Chunking (`chunk_text`): greedy up to `chunk_chars` characters, cut at the best boundary in the second half
of the window (a heading or a top-level `def`/`class`/`fn`... > a blank line > any line end), whole lines
only (a line longer than a chunk is split), and the next chunk starts up to `overlap_chars` of whole lines
before the cut. A chunk's id is a UUID made of sha256(path, text, occurrence), so it stays the same across
runs as long as its text and path do: an incremental re-index embeds only chunks it has not seen.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import CorpusError

TEXT_SUFFIXES = frozenset(
    """
.md .markdown .mdx .rst .txt .text .adoc .org .tex
.py .pyi .pyx .pxd .ipynb .c .h .cc .cpp .cxx .hpp .hh .cu .m .mm .rs .go .java .kt .kts .scala .swift .cs .fs
.js .mjs .cjs .ts .tsx .jsx .vue .svelte .rb .php .pl .pm .lua .r .jl .hs .ml .mli .ex .exs .erl .clj .dart .zig .nim
.sh .bash .zsh .fish .ps1 .bat .sql .graphql .proto .thrift
.toml .yaml .yml .ini .cfg .conf .json .jsonc .xml .html .htm .css .scss .less .cmake .mk .gradle .tf .nix
""".split()
)
TEXT_NAMES = frozenset(
    {
        "Makefile",
        "makefile",
        "GNUmakefile",
        "Dockerfile",
        "CMakeLists.txt",
        "README",
        "LICENSE",
        "COPYING",
        "NOTICE",
        "CHANGELOG",
        "AUTHORS",
        "Justfile",
        "Vagrantfile",
        "Gemfile",
        "Rakefile",
    }
)
SKIP_DIRS = frozenset({"__pycache__", "node_modules"})
SNIFF_BYTES = 8192
_BOUNDARY = re.compile(
    r"(#{1,6}\s|(async\s+)?def\s|class\s|fn\s|pub\s|func\s|function\s|impl\s|struct\s|interface\s|"
    r"export\s|module\s|package\s|[A-Za-z_][\w.]*\s*\(.*\)\s*\{\s*$|\.\.\s|[=\-~^]{3,}\s*$)"
)


@dataclass
class CorpusFile:
    path: str  # relative to the corpus root, '/'-separated
    sha256: str  # hex of the bytes
    size: int


@dataclass
class CorpusScan:
    root: Path
    files: list[CorpusFile] = field(default_factory=list)
    git: bool = False
    skipped: dict[str, int] = field(default_factory=lambda: {"binary": 0, "too_large": 0, "type": 0, "hidden": 0})
    unreadable: list[dict] = field(default_factory=list)  # {"path", "error"}

    @property
    def revision(self) -> str:
        """sha256 over the files' sorted names and hashes (DESIGN: the revision of a local directory)."""
        digest = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            digest.update(f"{f.path}\0{f.sha256}\n".encode())
        return digest.hexdigest()

    def stats(self) -> dict:
        return {
            "files": len(self.files),
            "bytes": sum(f.size for f in self.files),
            "git": self.git,
            "skipped": dict(self.skipped),
            "unreadable": list(self.unreadable),
            "revision": self.revision,
        }


@dataclass(frozen=True)
class Chunk:
    id: str  # UUID string, stable: sha256(path, text, occurrence)
    path: str
    start_line: int  # 1-based, inclusive
    end_line: int
    text: str


# --- selection -------------------------------------------------------------------------------------


def _git_files(root: Path) -> list[str] | None:
    """Paths (relative to root) git tracks or would track under root; None outside a checkout or without git."""
    try:
        inside = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True, timeout=60
        )
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "."],
            capture_output=True,
            timeout=600,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({p for p in out.stdout.decode("utf-8", "surrogateescape").split("\0") if p})


def _walk_files(root: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d not in SKIP_DIRS and not (Path(dirpath) / d / "pyvenv.cfg").exists()
        )
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / name).as_posix() for name in sorted(filenames))
    return found


def _wanted_type(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name in TEXT_NAMES or Path(name).suffix.lower() in TEXT_SUFFIXES


def is_binary(data: bytes) -> bool:
    """A NUL byte in the first 8 KiB, or bytes that are not UTF-8."""
    if b"\0" in data[:SNIFF_BYTES]:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def scan_corpus(root: str | Path, max_file_bytes: int = 1 << 20, use_git: bool = True) -> CorpusScan:
    """The files of `root` the index reads, with their hashes; see the module docstring for the rules."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise CorpusError(f"corpus {root} is not a directory: give the directory to index")
    scan = CorpusScan(root)
    listed = _git_files(root) if use_git else None
    scan.git = listed is not None
    for rel in listed if listed is not None else _walk_files(root):
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or any(p in SKIP_DIRS for p in parts[:-1]):
            scan.skipped["hidden"] += 1
            continue
        path = root / rel
        try:
            if path.is_symlink() or not path.is_file():
                continue  # deleted since listing, a symlink, a submodule directory
            size = path.stat().st_size
            if size > max_file_bytes:
                scan.skipped["too_large"] += 1
                continue
            if not _wanted_type(rel):
                scan.skipped["type"] += 1
                continue
            data = path.read_bytes()
        except OSError as exc:
            scan.unreadable.append({"path": rel, "error": exc.strerror or str(exc)})
            continue
        if is_binary(data):
            scan.skipped["binary"] += 1
            continue
        scan.files.append(CorpusFile(rel, hashlib.sha256(data).hexdigest(), len(data)))
    if listed is not None:  # virtualenvs that are not hidden but are tracked/untracked-not-ignored
        venvs = {str(Path(f.path).parent) for f in scan.files if f.path.endswith("pyvenv.cfg")}
        if venvs:
            scan.files = [f for f in scan.files if not any(f.path.startswith(v + "/") for v in venvs)]
    return scan


def read_text(root: Path, rel: str) -> str:
    return (Path(root) / rel).read_bytes().decode("utf-8")


# --- chunking --------------------------------------------------------------------------------------


def _split_long_lines(lines: list[str], limit: int) -> list[str]:
    out = []
    for line in lines:
        while len(line) > limit:
            out.append(line[:limit])
            line = line[limit:]
        if line:
            out.append(line)
    return out


def _cut_score(lines: list[str], k: int) -> int:
    """How good a chunk end before line k is: 3 heading/top-level definition, 2 after a blank line, 1 otherwise."""
    if k >= len(lines):
        return 3
    if _BOUNDARY.match(lines[k]):
        return 3
    return 2 if not lines[k - 1].strip() else 1


def chunk_text(text: str, path: str = "", chunk_chars: int = 1000, overlap_chars: int = 150) -> list[Chunk]:
    """Cut text into chunks of at most ~chunk_chars, on boundaries, with ~overlap_chars of overlap."""
    if chunk_chars < 50 or not 0 <= overlap_chars < chunk_chars // 2:
        raise ValueError(
            f"chunk_chars must be >= 50 and overlap_chars in [0, chunk_chars/2), got {chunk_chars}, {overlap_chars}"
        )
    raw = text.splitlines(keepends=True)
    lines = _split_long_lines(raw, chunk_chars)
    # 1-based source line of each (possibly split) line, for citations
    line_no, n = [], 0
    for line in raw:
        n += 1
        for _ in range(max(1, -(-len(line) // chunk_chars))):
            line_no.append(n)
    line_no = line_no[: len(lines)] or [1]
    chunks: list[Chunk] = []
    seen: dict[str, int] = {}
    i = 0
    while i < len(lines):
        j, size = i, 0
        while j < len(lines) and (j == i or size + len(lines[j]) <= chunk_chars):
            size += len(lines[j])
            j += 1
        k = j
        if j < len(lines):  # best boundary in the second half of the window, latest among equals
            acc, best = 0, (0, j)
            for cut in range(i + 1, j + 1):
                acc += len(lines[cut - 1])
                if acc >= chunk_chars // 2:
                    best = max(best, (_cut_score(lines, cut), cut))
            k = best[1]
        body = "".join(lines[i:k])
        if body.strip():
            occurrence = seen.get(body, 0)
            seen[body] = occurrence + 1
            digest = hashlib.sha256(f"{path}\0{occurrence}\0{body}".encode()).digest()
            chunks.append(Chunk(str(uuid.UUID(bytes=digest[:16])), path, line_no[i], line_no[k - 1], body))
        if k >= len(lines):
            break
        m, overlap = k, 0
        while m - 1 > i and overlap + len(lines[m - 1]) <= overlap_chars:
            m -= 1
            overlap += len(lines[m])
        i = m
    return chunks


def embedding_text(chunk: Chunk) -> str:
    """What is embedded for a chunk: its path (context for code) then its text."""
    return f"{chunk.path}\n{chunk.text}"
