"""Trace files: the layer requests of a node's scanners, one per line, to replay through the cache.

The format is plain text, so that an operator can take a trace from a real node with a few lines
of shell or a log filter, read it with ``awk``, and replay it (``nvcache replay TRACE``)::

    # comment lines start with '#'; blank lines are ignored
    # time layer_id size image
    0.000000 sha256:4f1c... 8120 registry.example/app:1.2
    0.000412 sha256:77ab... 1930 registry.example/app:1.2
    0.003101 sha256:4f1c... 8120 registry.example/db:15

One request per line, four fields separated by single spaces:

``time``
    When the request was made, in seconds, as a decimal number (``12``, ``0.25``, ``1e-3``:
    anything Python's ``float`` reads, finite). Informational: lines are replayed in file order.
``layer_id``
    The layer's id (a digest, say): what the cache accepts, 1-1024 characters of printable
    ASCII without whitespace.
``size``
    The size of the layer's scan record in bytes, an integer from 1 to 2**40 (the largest bound
    a cache can have). What a hit saves reading and what analysing the layer costs in the cost
    model. A layer's first line gives its size: later lines with another size count as that.
``image``
    The name or id of the image being scanned, without spaces.

Scans: the requests of one image scan are consecutive lines with the same ``image``. A line
whose image differs from the line before starts a new scan (so the same image scanned again
after another one is a new scan). During a scan the image's layers (every layer id of its run
of lines) are the ``keep`` set of its puts, as a scanner keeps the layers of the image it is
scanning. Two consecutive scans of the same image are one run of lines: the same ``keep`` set,
so it replays the same. Scans that ran concurrently on the node (several scanner processes)
interleave in a trace in time order and then replay as shorter scans.

:func:`read_trace` yields :class:`Request` objects and raises :class:`TraceFormatError` (a
``ValueError``) naming the file and line number of a malformed line; :func:`write_trace` writes
requests (times to the nanosecond, so times with at most nine decimals read back equal).
The file is UTF-8 (a line that is not is malformed too).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, List, Optional, Tuple, Union

from .names import layer_id_bytes

MAX_SIZE = 1 << 40  # a record larger than any bound (arguments.MAX_MB) cannot be a layer's

FIELDS = ("time", "layer_id", "size", "image")
HEADER = "# nvcache trace: one request per line: time layer_id size image (see nvcache/trace.py)"

PathOrFile = Union[str, "os.PathLike[str]", IO[str]]


@dataclass(frozen=True)
class Request:
    """One layer request: at ``time`` (seconds), the layer ``layer_id`` whose record has ``size``
    bytes, during a scan of ``image``."""

    time: float
    layer_id: str
    size: int
    image: str

    def line(self) -> str:
        """The request as a line of the format (no newline); ValueError if a field cannot be written."""
        check_request(self)
        return f"{_time_text(self.time)} {self.layer_id} {self.size} {self.image}"


class TraceFormatError(ValueError):
    """A line of a trace file that is not ``time layer_id size image``: ``path`` and ``line`` (1-based) say
    where, the message says what is wrong."""

    def __init__(self, path: str, line: int, problem: str, text: str) -> None:
        shown = text if len(text) <= 120 else text[:117] + "..."
        super().__init__(f"{path}, line {line}: {problem} (expected 'time layer_id size image', got {shown!r})")
        self.path = path
        self.line = line
        self.problem = problem


def _time_text(t: float) -> str:
    """A time as a plain decimal to the nanosecond, without trailing zeros (``1.5``, ``0.000412``)."""
    text = f"{t:.9f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _name_problem(what: str, value: object) -> Optional[str]:
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string"
    if any(c.isspace() for c in value):
        return f"{what} must not contain spaces or other whitespace"
    return None


def check_request(r: Request) -> None:
    """ValueError unless ``r`` can be written as a line and read back the same."""
    if isinstance(r.time, bool) or not isinstance(r.time, (int, float)) or not math.isfinite(r.time):
        raise ValueError(f"time must be a finite number of seconds, got {r.time!r}")
    if isinstance(r.size, bool) or not isinstance(r.size, int) or not 0 < r.size <= MAX_SIZE:
        raise ValueError(f"size must be an integer from 1 to {MAX_SIZE}, got {r.size!r}")
    for what, value in (("layer_id", r.layer_id), ("image", r.image)):
        problem = _name_problem(what, value)
        if problem:
            raise ValueError(f"{problem}, got {value!r}")


def parse_line(text: str, path: str = "<trace>", line: int = 0) -> Optional[Request]:
    """The request of one line, or None for a comment or blank line; TraceFormatError otherwise.

    The line may end with its newline (``\\n`` or ``\\r\\n``)."""
    body = text.rstrip("\r\n")
    stripped = body.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = body.split(" ")
    if len(fields) != 4 or not all(fields):
        count = len(body.split())
        problem = (f"{count} fields instead of 4" if count != 4 else
                   "fields must be separated by single spaces")
        raise TraceFormatError(path, line, problem, body)
    time_text, layer_id, size_text, image = fields
    try:
        t = float(time_text)
    except ValueError:
        raise TraceFormatError(path, line, f"time {time_text!r} is not a number", body) from None
    if not math.isfinite(t):
        raise TraceFormatError(path, line, f"time {time_text!r} is not finite", body)
    if (not size_text.isascii() or not size_text.isdigit() or len(size_text) > 20
            or not 0 < int(size_text) <= MAX_SIZE):
        raise TraceFormatError(path, line, f"size {size_text[:24]!r} is not an integer from 1 to {MAX_SIZE}", body)
    for what, value in (("layer_id", layer_id), ("image", image)):
        bad = _name_problem(what, value)
        if bad:  # a tab or other whitespace inside a field
            raise TraceFormatError(path, line, bad, body)
    try:
        layer_id_bytes(layer_id)  # the cache's own rule, here rather than in the middle of a replay
    except ValueError as exc:
        raise TraceFormatError(path, line, str(exc), body) from None
    return Request(t, layer_id, int(size_text), image)


def _name(source: PathOrFile) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<trace>"))


def read_trace(source: PathOrFile) -> Iterator[Request]:
    """The requests of a trace file (a path, or a text file object), in file order.

    Lazy: a malformed line raises :class:`TraceFormatError` when it is reached."""
    name = _name(source)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            yield from _read(fh, name)
    else:
        yield from _read(source, name)


def _read(fh: IO, name: str) -> Iterator[Request]:
    for number, text in enumerate(fh, 1):
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TraceFormatError(name, number, f"not UTF-8 ({exc.reason} at byte {exc.start})",
                                       text.decode("utf-8", "replace")) from None
        request = parse_line(text, name, number)
        if request is not None:
            yield request


def target_problem(path: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    """Why a trace file cannot be written at ``path`` (None: it can), for a run that ends by
    writing one to say so before it starts."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"the directory of {os.fspath(path)} does not exist"
    if os.path.lexists(path) and not os.path.isfile(path):
        return f"{os.fspath(path)} is not a regular file"
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".nvcache-trace-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror}"
    return None


def write_trace(dest: PathOrFile, requests: Iterable[Request], comments: Iterable[str] = ()) -> int:
    """Write ``requests`` as a trace file (a path, or a text file object); the number written.

    The file starts with :data:`HEADER` and then each of ``comments`` as a ``#`` line. A path is
    written whole or not at all: into a new file beside it, renamed over it at the end (OSError
    or a request that cannot be written, ValueError, leaves ``dest`` as it was)."""
    if not isinstance(dest, (str, os.PathLike)):
        return _write(dest, requests, comments)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), prefix=".nvcache-trace-")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # as open() would make it
        with open(fd, "w", encoding="utf-8", newline="\n") as fh:
            n = _write(fh, requests, comments)
        os.replace(tmp, dest)
        return n
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write(fh: IO[str], requests: Iterable[Request], comments: Iterable[str]) -> int:
    out = io.StringIO()
    out.write(HEADER + "\n")
    for comment in comments:
        for part in comment.splitlines() or [""]:
            out.write(f"# {part}\n".replace("# \n", "#\n"))
    n = 0
    for r in requests:
        out.write(r.line() + "\n")
        n += 1
        if n % 4096 == 0:
            fh.write(out.getvalue())
            out = io.StringIO()
    fh.write(out.getvalue())
    return n


def scans(requests: Iterable[Request]) -> Iterator[Tuple[str, List[Request]]]:
    """The scans of a trace: (image, its requests) for each run of consecutive requests of one image."""
    image: Optional[str] = None
    run: List[Request] = []
    for r in requests:
        if r.image != image and run:
            assert image is not None
            yield image, run
            run = []
        image = r.image
        run.append(r)
    if run:
        assert image is not None
        yield image, run
