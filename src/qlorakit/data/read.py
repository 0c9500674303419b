"""Read a data source into rows: local JSON, JSONL, CSV/TSV and Parquet files, or a hub dataset.

Every row keeps where it came from (1-based line of a text file; 1-based row number of a Parquet
file or hub dataset), so later errors can say ``data/train.jsonl:4: field 'output' is missing``.
Nothing here knows about formats or tokenizers; it only turns bytes into ``dict`` rows.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from qlorakit.data.errors import DataError

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WS = " \t\r\n"


@dataclass(frozen=True)
class Table:
    """Rows read from one source, each with its location.

    Attributes:
        source: the path or hub id as given, used verbatim in error messages.
        rows: one ``dict`` per example, keys as in the file.
        lines: for each row, its 1-based line (``unit == "line"``) or row number (``"row"``).
        unit: ``"line"`` for text files (JSON, JSONL, CSV), ``"row"`` for Parquet and hub datasets.
    """

    source: str
    rows: list[dict]
    lines: list[int]
    unit: str = "line"

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """``"data/train.jsonl:4"`` (line-based) or ``"data/train.parquet: row 4"`` for row ``i``."""
        if self.unit == "line":
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source}: row {self.lines[i]}"

    def select(self, indices: list[int]) -> Table:
        """The rows at ``indices``, in that order, keeping their locations."""
        return Table(self.source, [self.rows[i] for i in indices], [self.lines[i] for i in indices], self.unit)


def read_rows(path: str | Path) -> Table:
    """Read ``path`` into a :class:`Table`.

    A path that exists is read by its suffix (``.json``, ``.jsonl``/``.ndjson``, ``.csv``, ``.tsv``,
    ``.parquet``). A path that does not exist, has no known suffix and looks like ``owner/name`` is
    loaded from the Hugging Face Hub with ``datasets.load_dataset(name, split="train")``.

    Raises:
        DataError: one line naming the file and, where it has one, the line: missing file, bad
            UTF-8, invalid JSON/CSV, a row that is not an object, or no rows at all.
    """
    source = str(path)
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.exists():
        if suffix not in SUFFIXES and _HUB_ID.match(source):
            return _read_hub(source)
        raise DataError(f"{source}: no such file")
    if p.is_dir():
        raise DataError(f"{source}: is a directory; give a data file (.json, .jsonl, .csv, .tsv, .parquet)")
    kind = SUFFIXES.get(suffix)
    if kind is None:
        raise DataError(f"{source}: unsupported file type {suffix or '(no suffix)'!r}; use .json, .jsonl, .csv, .tsv or .parquet")
    if kind == "parquet":
        table = _read_parquet(p, source)
    else:
        text = _decode(p.read_bytes(), source)
        if not text.strip():
            raise DataError(f"{source}: empty file (no rows)")
        reader = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "tsv": _read_csv}[kind]
        table = reader(text, source, delimiter="\t") if kind == "tsv" else reader(text, source)
    if not table.rows:
        raise DataError(f"{source}: empty file (no rows)")
    return table


def _decode(raw: bytes, source: str) -> str:
    """UTF-8 text of a file (a leading BOM dropped); a bad byte is reported by line and in-line offset."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        offset = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise DataError(f"{source}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {offset})") from None


def _as_object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: row is a JSON {type(value).__name__}, expected an object with named fields")
    return value


def _read_jsonl(text: str, source: str) -> Table:
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (and a trailing newline) are not rows
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(_as_object(value, f"{source}:{n}"))
        lines.append(n)
    return Table(source, rows, lines)


def _read_json(text: str, source: str) -> Table:
    """A JSON list of objects, or an object whose ``"data"`` key holds that list.

    Rows get the line where their object starts: the document is walked element by element with
    ``JSONDecoder.raw_decode``, which reports where each element ends.
    """
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(text, source)  # a .json file that is really JSON Lines
        raise DataError(f"{source}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    i = _skip_ws(text, 0)
    if text[i] == "{":
        i = _find_data_list(text, i, source)
    elif text[i] != "[":
        raise DataError(f"{source}:1: expected a JSON list of rows or an object with a 'data' list")
    rows, lines = [], []
    for value, start in _array_items(text, i):
        line = text.count("\n", 0, start) + 1
        rows.append(_as_object(value, f"{source}:{line}"))
        lines.append(line)
    return Table(source, rows, lines)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _array_items(text: str, i: int):
    """Yield (value, start offset) for each element of the (already validated) array at ``text[i]``."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, i + 1)
    while text[i] != "]":
        value, end = decoder.raw_decode(text, i)
        yield value, i
        i = _skip_ws(text, end)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)


def _find_data_list(text: str, i: int, source: str) -> int:
    """Offset of the ``[`` that opens the ``"data"`` value of the object at ``text[i]``."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, i + 1)
    while text[i] != "}":
        key, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
        if key == "data" and text[i] == "[":
            return i
        _, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, i)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    raise DataError(f"{source}:1: a JSON object must hold its rows in a 'data' list")


def _read_csv(text: str, source: str, delimiter: str = ",") -> Table:
    """Header line, then one row per record; every value is a string. Quoted newlines are allowed,
    and a row's line is where its record starts."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header, rows, lines = None, [], []
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{source}:{reader.line_num}: invalid CSV ({e})") from None
        if not record or record == [""]:
            continue
        if header is None:
            header = record
            continue
        if len(record) > len(header):
            raise DataError(f"{source}:{start}: row has {len(record)} fields, the header has {len(header)}")
        rows.append(dict(zip(header, record)))  # a short row lacks its last keys: reported as missing
        lines.append(start)
    return Table(source, rows, lines)


def _read_parquet(p: Path, source: str) -> Table:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{source}: not a readable Parquet file ({_first_line(e)})") from None
    return Table(source, rows, list(range(1, len(rows) + 1)), unit="row")


def _read_hub(name: str) -> Table:
    try:
        import datasets

        rows = datasets.load_dataset(name, split="train").to_list()
    except Exception as e:  # network, auth, missing dataset, offline mode: all one message
        raise DataError(
            f"{name}: no such file, and loading it as a Hugging Face Hub dataset failed ({_first_line(e)})"
        ) from None
    if not rows:
        raise DataError(f"{name}: empty dataset (no rows)")
    return Table(name, rows, list(range(1, len(rows) + 1)), unit="row")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
