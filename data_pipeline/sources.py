"""Input documents for prepare: text files, directories, JSONL and Parquet, local or on any pyarrow FS.

Why this shape: prepare's output must be byte-identical on a re-run, so the document order is fixed
here once: inputs in the order given, directories expanded recursively and sorted by path, records in
file order. A plain text file is one document; each JSONL line and each Parquet row is one document
(its `text_column`). Compressed inputs (.gz, .zst, .bz2, .lz4) are decompressed on the fly by pyarrow.

Traded off: text files are decoded as UTF-8 with replacement characters rather than failing, because
one stray byte in a large crawl should not stop a prepare; empty documents are skipped (they would add
only separators).
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .storage import Location, resolve

__all__ = ["InputFile", "list_inputs", "iter_documents"]

_COMPRESSED = (".gz", ".zst", ".bz2", ".lz4")
_JSONL = (".jsonl", ".ndjson", ".json")
_PARQUET = (".parquet", ".pq")


@dataclass(frozen=True)
class InputFile:
    location: Location
    path: str
    kind: str  # "text" | "jsonl" | "parquet"
    size: int

    @property
    def name(self) -> str:
        return self.path if self.location.local else f"{self.location.uri.split('?')[0]}:{self.path}"


def _kind(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(_JSONL):
        return "jsonl"
    if name.endswith(_PARQUET):
        return "parquet"
    return "text"


def list_inputs(inputs: list[str] | str, pattern: str | None = None) -> list[InputFile]:
    """Expand files and directories (recursively, sorted); `pattern` filters directory members."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("prepare needs at least one input (a file, a directory or a URI); got none")
    files: list[InputFile] = []
    for item in inputs:
        loc = resolve(item)
        info = loc.fs.get_file_info(loc.root)
        if info.type == pafs.FileType.File:
            files.append(InputFile(loc, loc.root, _kind(loc.root), int(info.size or 0)))
        elif info.type == pafs.FileType.Directory:
            members = loc.fs.get_file_info(pafs.FileSelector(loc.root, recursive=True))
            for m in sorted(members, key=lambda m: m.path):
                base = posixpath.basename(m.path)
                if m.type != pafs.FileType.File or base.startswith("."):
                    continue
                if pattern and not fnmatch.fnmatch(base, pattern):
                    continue
                files.append(InputFile(loc, m.path, _kind(m.path), int(m.size or 0)))
        else:
            raise ValueError(f"input {item!r} does not exist (neither a file nor a directory)")
    if not files:
        raise ValueError(
            f"no input files found in {inputs}" + (f" matching pattern {pattern!r}" if pattern else "")
            + "; check the paths (and --pattern)"
        )
    return files


def _open(f: InputFile):
    return f.location.fs.open_input_stream(f.path, compression="detect")


def iter_documents(files: list[InputFile], text_column: str = "text") -> Iterator[str]:
    """Every non-empty document of every file, in a fixed order."""
    for f in files:
        if f.kind == "text":
            with _open(f) as stream:
                text = stream.read().decode("utf-8", errors="replace")
            if text:
                yield text
        elif f.kind == "jsonl":
            yield from _jsonl(f, text_column)
        else:
            yield from _parquet(f, text_column)


def _jsonl(f: InputFile, column: str) -> Iterator[str]:
    with _open(f) as stream:
        data = stream.read().decode("utf-8", errors="replace")
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{f.name}:{lineno} is not valid JSON ({exc})") from exc
        text = record.get(column) if isinstance(record, dict) else None
        if not isinstance(text, str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{f.name}:{lineno} has no string field {column!r} (fields: {keys}); "
                "name the text field with text_column= (CLI --text-column)"
            )
        if text:
            yield text


def _parquet(f: InputFile, column: str) -> Iterator[str]:
    with f.location.fs.open_input_file(f.path) as handle:
        pf = pq.ParquetFile(handle)
        names = pf.schema_arrow.names
        if column not in names:
            raise ValueError(
                f"{f.name} has no column {column!r} (columns: {names}); "
                "name the text column with text_column= (CLI --text-column)"
            )
        for batch in pf.iter_batches(columns=[column], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
