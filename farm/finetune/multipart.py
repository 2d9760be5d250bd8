"""Parsing a `POST /v1/files` body: python-multipart's streaming parser, bounded in parts and field
sizes, run by the caller off the event loop (a body of thousands of tiny parts costs CPU time that
must not stall other tenants' requests)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from farm.finetune.errors import bad_request

MAX_PARTS = 8  # file, purpose, and room for a client's extra fields; more is not an upload
MAX_FIELD_BYTES = 1024  # a form field (purpose) is a word, not a payload


@dataclass
class Upload:
    """The form fields and the `file` part of an upload."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    data: bytes | None = None


class _Collector:
    def __init__(self):
        self.out = Upload()
        self.parts = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._filename: str | None = None
        self._buf = bytearray()

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_request(f"the multipart body has more than {MAX_PARTS} parts (an upload is 'file' and "
                              "'purpose')")
        self._headers, self._name, self._filename, self._buf = {}, None, None, bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[bytes(self._header_field).decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        name, filename = params.get(b"name"), params.get(b"filename")
        self._name = name.decode("utf-8", "replace") if name is not None else None
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self._buf += data[start:end]
        if self._name != "file" and len(self._buf) > MAX_FIELD_BYTES:
            raise bad_request(f"form field {self._name!r} is over {MAX_FIELD_BYTES} bytes", self._name)

    def part_end(self) -> None:
        if self._name == "file":
            if self.out.data is not None:
                raise bad_request("the multipart body has more than one 'file' part", "file")
            self.out.filename, self.out.data = self._filename or "upload.jsonl", bytes(self._buf)
        elif self._name:
            self.out.fields[self._name] = self._buf.decode("utf-8", "replace")
        self._buf = bytearray()


def parse(content_type: str, chunks: Iterable[bytes]) -> Upload:
    """The fields and file of a multipart/form-data body; a 400 naming the problem when it is not one."""
    from python_multipart import MultipartParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise bad_request("POST /v1/files takes multipart/form-data with 'file' and 'purpose'")
    c = _Collector()
    callbacks = {"on_part_begin": c.part_begin, "on_part_data": c.part_data, "on_part_end": c.part_end,
                 "on_header_field": c.header_field, "on_header_value": c.header_value,
                 "on_header_end": c.header_end, "on_headers_finished": c.headers_finished}
    parser = MultipartParser(params[b"boundary"], callbacks)
    try:
        for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise bad_request(f"malformed multipart body: {exc}") from None
    return c.out
