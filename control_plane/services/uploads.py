"""Streaming multipart receiver: the file part goes straight into a `BlobWriter`, never into memory.

FastAPI's `UploadFile` would spool the whole body to a temp file before the handler runs, so the
size limit could only be checked after the disk had taken it all. We parse the stream ourselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from control_plane.errors import DomainError, ErrorCode
from control_plane.storage import BlobWriter, LocalBlobStore

MAX_FIELD_BYTES = 256 * 1024
MAX_FIELDS = 64


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    writer: BlobWriter | None = None
    filename: str | None = None


class _Receiver:
    def __init__(self, store: LocalBlobStore, max_bytes: int, file_field: str) -> None:
        self.form = ReceivedForm()
        self._store = store
        self._max_bytes = max_bytes
        self._file_field = file_field
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._buffer = bytearray()
        self._to_file = False

    def on_part_begin(self) -> None:
        self._headers = {}
        self._buffer = bytearray()
        self._to_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode(errors="replace")
        filename = options.get(b"filename")
        if self._name == self._file_field and filename is not None:
            if self.form.writer is not None:
                raise DomainError(ErrorCode.VALIDATION_ERROR, f"only one {self._file_field!r} part is allowed")
            self.form.writer = self._store.writer(self._max_bytes)
            self.form.filename = filename.decode(errors="replace")
            self._to_file = True
        elif len(self.form.fields) >= MAX_FIELDS:
            raise DomainError(ErrorCode.VALIDATION_ERROR, "too many form fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._to_file:
            assert self.form.writer is not None
            self.form.writer.write(data[start:end])
            return
        self._buffer += data[start:end]
        if len(self._buffer) > MAX_FIELD_BYTES:
            raise DomainError(ErrorCode.VALIDATION_ERROR, f"form field {self._name!r} is larger than 256 KiB")

    def on_part_end(self) -> None:
        if not self._to_file and self._name:
            try:
                self.form.fields[self._name] = self._buffer.decode()
            except UnicodeDecodeError as exc:
                raise DomainError(ErrorCode.VALIDATION_ERROR, f"form field {self._name!r} is not UTF-8 text") from exc


async def receive_multipart(
    content_type: str,
    chunks: AsyncIterator[bytes],
    *,
    store: LocalBlobStore,
    max_bytes: int,
    file_field: str = "file",
) -> ReceivedForm:
    """Consume a multipart/form-data body; on any error the partial file is removed."""
    ctype, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise DomainError(ErrorCode.VALIDATION_ERROR, "expected a multipart/form-data body with a boundary")
    receiver = _Receiver(store, max_bytes, file_field)
    callbacks = {
        name: getattr(receiver, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in chunks:
            _feed(parser, chunk)
        _feed(parser, None)
        if receiver.form.writer is not None:
            receiver.form.writer.finish_writing()
    except BaseException:
        if receiver.form.writer is not None:
            receiver.form.writer.abort()
        raise
    return receiver.form


def _feed(parser: MultipartParser, chunk: bytes | None) -> None:
    """Write a chunk (None: the end) to the parser; a malformed body is the client's error, a 422."""
    try:
        if chunk is None:
            parser.finalize()
        else:
            parser.write(chunk)
    except FormParserError as exc:
        raise DomainError(ErrorCode.VALIDATION_ERROR, f"malformed multipart/form-data body: {exc}") from exc
