"""The examples cache: a large dataset read, tokenized and fitted once, kept on disk by content.

An entry is two files named by a key that hashes everything the examples depend on: the bytes
of the source, the split, the reader and encoder, the tokenizer (its whole serialized state and
chat template), the length budget, the columns renamed (``data.columns``) and
:data:`EXAMPLES_VERSION`. ``<key>.arrow`` holds the
examples (:mod:`preftune.data.arrow`); ``<key>.json`` what else the run prints and checks: the
layout, the truncation report, the rows left out, the content digest, and the Arrow file's size
and checksum. Each file is written whole or not at all, the Arrow file first, so an entry is
complete once its JSON exists. A later run, or another process of this one, reads the entry
instead of the source; an entry whose Arrow file fails its checksum is computed again.

Only datasets of at least :data:`MIN_BYTES` take this path; smaller ones are read into memory,
which is quicker for them and holds little.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash
from transformers import PreTrainedTokenizerBase

from preftune.data.chunked import Recipe, encode_in_chunks
from preftune.data.encode import ExpansionReport, TruncationReport
from preftune.errors import DataError
from preftune.files import replaced_atomically, write_text_atomically

EXAMPLES_VERSION = 1
"""Bump when encoding changes what examples a dataset gives, so that old entries are not used."""
MIN_BYTES = 16 * 2**20
"""The smallest source that is cached: below it, reading it into memory is quicker than hashing,
writing and mapping it, and its Python objects are small."""
if TYPE_CHECKING:
    from preftune.data.arrow import ArrowExamples

REPORTS = {kind.__name__: kind for kind in (TruncationReport, ExpansionReport)}
READ_SIZE = 2**20


@dataclass(frozen=True)
class Stored:
    """A dataset's cache entry as the main process shares it: where its examples are, their
    content digest, the layout, the truncation report and the rows left out (as
    ``(source, message, row, field)``, which pickle where ``DataError`` does not)."""

    path: Path
    content_digest: str
    layout: str
    report: TruncationReport
    skipped: list[tuple[str, str, int | None, str | None]]

    def examples(self) -> ArrowExamples:
        # Imported here, as in _compute: pyarrow is slow to import, and most datasets are small.
        from preftune.data.arrow import ArrowExamples

        return ArrowExamples(self.path, self.content_digest)

    def complete(self) -> bool:
        """Whether this entry's files are on this process's disk (its JSON is written last)."""
        return self.path.with_suffix(".json").exists()

    def skipped_errors(self) -> list[DataError]:
        return [DataError(*parts) for parts in self.skipped]


def cacheable(spec: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``spec`` is read through the cache: a local file or ``datasets`` directory of at
    least :data:`MIN_BYTES`, read with a tokenizer whose whole state can be hashed (a fast one)."""
    path = Path(spec).expanduser()
    if not (path.is_file() or path.is_dir()) or _tokenizer_state(tokenizer) is None:
        return False
    return sum(part.stat().st_size for part in _files(path)) >= MIN_BYTES


def stored(
    spec: str,
    split: str,
    recipe: Recipe,
    directory: Path,
    *,
    collect: bool,
    num_proc: int,
    say: Callable[[str], None],
) -> Stored:
    """The cache entry of ``spec`` for ``recipe``, from ``directory`` when it holds an intact
    one, else computed and written there; ``say`` prints where the examples come from and why
    an entry is not used. ``collect`` is ``data.on_error=skip``: without it, an entry with rows
    left out raises the first, as reading the file would."""
    key = examples_key(Path(spec).expanduser(), split, recipe)
    arrow, entry = directory / f"{key}.arrow", directory / f"{key}.json"
    found = _read_entry(spec, arrow, entry, say)
    if found is None:
        found = _compute(spec, split, recipe, arrow, entry, collect, num_proc)
        say(f"{spec}: tokenized examples written to the cache ({arrow})")
    else:
        say(f"{spec}: tokenized examples from the cache ({arrow})")
    if found.skipped and not collect:
        raise found.skipped_errors()[0]
    return found


def examples_key(source: Path, split: str, recipe: Recipe) -> str:
    """The hash of everything the examples of ``source`` under ``recipe`` depend on."""
    digest = xxhash.xxh3_128()
    state = _tokenizer_state(recipe.tokenizer)
    parts = (
        f"preftune examples {EXAMPLES_VERSION}",
        split,
        _name(recipe.read),
        _name(recipe.encode),
        repr(recipe.budget),
        type(recipe.tokenizer).__name__,
        repr(state),
        _source_digest(source),
        # Only where set, so the entries of sources read without a mapping keep their keys.
        *([f"columns {sorted(recipe.columns.items())!r}"] if recipe.columns else []),
    )
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _name(function: Any) -> str:
    return f"{function.__module__}.{function.__qualname__}"


def _tokenizer_state(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...] | None:
    """What a fast tokenizer's ids depend on: its serialized backend (vocabulary, merges,
    normalizer, pre-tokenizer, post-processor, added tokens), chat template and EOS; None for a
    tokenizer without a serializable backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return (backend.to_str(), str(tokenizer.chat_template), str(tokenizer.eos_token_id))


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _source_digest(path: Path) -> str:
    """A checksum of the bytes of ``path``, or of every file under it with its name."""
    digest = xxhash.xxh3_128()
    for part in _files(path):
        digest.update(f"{part.relative_to(path)}:{_checksum(part)};".encode())
    return digest.hexdigest()


def _checksum(path: Path) -> str:
    """xxh3-128 of a file's bytes, read a mebibyte at a time."""
    digest = xxhash.xxh3_128()
    with path.open("rb") as file:
        while block := file.read(READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


def _compute(
    spec: str,
    split: str,
    recipe: Recipe,
    arrow: Path,
    entry: Path,
    collect: bool,
    num_proc: int,
) -> Stored:
    from preftune.data.arrow import ExampleWriter

    arrow.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(arrow) as partial, ExampleWriter(partial) as writer:
        outcome = encode_in_chunks(
            spec, split, recipe, writer.write, collect=collect, num_proc=num_proc
        )
    skipped = [(e.source, e.message, e.row, e.field) for e in outcome.skipped]
    found = Stored(arrow, writer.digest.hexdigest(), outcome.layout, outcome.report, skipped)
    record = {
        "bytes": arrow.stat().st_size,
        "checksum": _checksum(arrow),
        "content_digest": found.content_digest,
        "layout": found.layout,
        "report": {"kind": type(found.report).__name__, **asdict(found.report)},
        "skipped": skipped,
    }
    write_text_atomically(entry, json.dumps(record, indent=1) + "\n")
    return found


def _read_entry(spec: str, arrow: Path, entry: Path, say: Callable[[str], None]) -> Stored | None:
    """The entry at ``entry`` and ``arrow``; None when there is none, or, with a line saying
    so, when it cannot be used."""
    if not entry.exists():
        return None
    try:
        record = json.loads(entry.read_text(encoding="utf-8"))
        problem = _problem(record, arrow)
        if problem is None:
            report = dict(record["report"])
            kind = REPORTS[report.pop("kind")]
            skipped = [tuple(parts) for parts in record["skipped"]]
            return Stored(
                arrow, record["content_digest"], record["layout"], kind(**report), skipped
            )
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"cannot be read ({type(error).__name__}: {error})"
    say(f"{spec}: the examples cache {arrow} {problem}; reading and tokenizing again")
    return None


def _problem(record: dict[str, Any], arrow: Path) -> str | None:
    """What is wrong with the entry ``record`` describes, if anything."""
    if not arrow.exists():
        return "is missing"
    if arrow.stat().st_size != record["bytes"]:
        return f"holds {arrow.stat().st_size} bytes, not {record['bytes']}"
    if _checksum(arrow) != record["checksum"]:
        return "does not match its checksum"
    return None
