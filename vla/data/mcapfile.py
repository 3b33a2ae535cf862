"""MCAP files checked end to end. rosbags' writer leaves every CRC at 0 ("not computed"), so the
episode writer fills them in once a file is complete (add_crcs), and the reader verifies a whole
file before it parses any of it (read_records): a damaged byte anywhere is McapDamage, never a
decompressor's or deserialiser's exception, and never silently different data.

Layout (https://mcap.dev/spec): magic, data section (header, chunks, message indexes, metadata,
then DataEnd holding the CRC of every byte before it), summary section, summary offsets, footer
(holding the CRC of the summary section and of the footer's own fields), magic. A chunk holds the
CRC of its uncompressed records. A CRC of 0 is "not computed" (older bags, other writers): such a
part is checked for structure only.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import lz4.frame
import zstandard
from mcap.data_stream import ReadDataStream
from mcap.exceptions import McapError
from mcap.records import Channel, Message, Schema

MAGIC = b"\x89MCAP0\r\n"
OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK, OP_DATA_END = 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F
RECORD = struct.Struct("<BQ")  # opcode, length of the body
DATA_END = struct.Struct("<BQI")  # opcode, length, data_section_crc
FOOTER = struct.Struct("<BQQQI")  # opcode, length, summary_start, summary_offset_start, summary_crc
CHUNK = struct.Struct("<QQQI")  # message start and end time, uncompressed size, uncompressed CRC
CHUNK_CRC = 24  # offset of the CRC in a chunk's body
DECOMPRESS = {
    "": bytes,
    "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),  # grows with the output
    "lz4": lz4.frame.decompress,
}


class McapDamage(ValueError):
    """A truncated, corrupt or unsupported MCAP file; the message says what is wrong."""


def add_crcs(path: str | Path) -> None:
    """Fill in the chunk, data section and summary CRCs of the complete MCAP file at `path`, in
    place: the file keeps its size and every other byte."""
    buf = bytearray(Path(path).read_bytes())
    data_end, summary_start, footer = _layout(buf)
    for start, opcode, body in _framed(memoryview(buf)[:data_end], len(MAGIC)):
        if opcode == OP_CHUNK:
            struct.pack_into("<I", buf, start + RECORD.size + CHUNK_CRC, zlib.crc32(_chunk_records(body)))
    struct.pack_into("<I", buf, data_end + RECORD.size, zlib.crc32(memoryview(buf)[:data_end]))
    struct.pack_into("<I", buf, footer + FOOTER.size - 4, zlib.crc32(_summary(buf, summary_start, footer)))
    with open(path, "r+b") as f:  # same length: overwritten in place, never truncated
        f.write(buf)


def read_records(buf: bytes) -> tuple[dict[int, Schema], dict[int, Channel], list[Message]]:
    """The schemas, channels and messages of the MCAP file `buf`, in file order, after checking
    its framing and every CRC it has; McapDamage otherwise."""
    data_end, summary_start, footer = _layout(buf)
    view = memoryview(buf)
    stored = DATA_END.unpack_from(buf, data_end)[2]
    if stored and zlib.crc32(view[:data_end]) != stored:
        raise McapDamage("corrupt MCAP: the data section does not match its CRC")
    stored = FOOTER.unpack_from(buf, footer)[4]
    if stored and zlib.crc32(_summary(view, summary_start, footer)) != stored:
        raise McapDamage("corrupt MCAP: the summary section does not match its CRC")
    schemas, channels, messages = {}, {}, []
    try:
        for record in _parsed(view[:data_end], len(MAGIC)):
            if isinstance(record, Message):
                messages.append(record)
            else:
                (schemas if isinstance(record, Schema) else channels)[record.id] = record
    except (McapError, struct.error, UnicodeDecodeError) as exc:
        raise McapDamage(f"corrupt MCAP record: {exc!r}") from None
    return schemas, channels, messages


def _layout(buf) -> tuple[int, int, int]:
    """(DataEnd, summary start, footer) offsets of a complete MCAP file."""
    if len(buf) < 2 * len(MAGIC) + DATA_END.size + FOOTER.size or buf[: len(MAGIC)] != MAGIC:
        raise McapDamage("not an MCAP file (bad magic or too short)")
    if buf[-len(MAGIC) :] != MAGIC:
        raise McapDamage("truncated MCAP: no end magic (the recording did not finish)")
    footer = len(buf) - len(MAGIC) - FOOTER.size
    opcode, length, summary_start, _, _ = FOOTER.unpack_from(buf, footer)
    if opcode != OP_FOOTER or length != FOOTER.size - RECORD.size or summary_start > footer:
        raise McapDamage("corrupt MCAP footer")
    data_end = (summary_start or footer) - DATA_END.size  # the data section ends where the summary starts
    if data_end < len(MAGIC) or DATA_END.unpack_from(buf, data_end)[:2] != (OP_DATA_END, 4):
        raise McapDamage("corrupt MCAP: no DataEnd record before the summary")
    return data_end, summary_start, footer


def _summary(buf, summary_start: int, footer: int):
    """What the footer's CRC covers: the summary section and the footer up to that CRC."""
    return buf[summary_start or footer : footer + FOOTER.size - 4]


def _framed(data: memoryview, start: int = 0):
    """(offset, opcode, body) of each record in `data` from `start`."""
    while start < len(data):
        if start + RECORD.size > len(data):
            raise McapDamage(f"corrupt MCAP: a record header at byte {start} is cut off")
        opcode, length = RECORD.unpack_from(data, start)
        end = start + RECORD.size + length
        if end > len(data):
            raise McapDamage(f"corrupt MCAP: the record at byte {start} claims {length} bytes, more than there are")
        yield start, opcode, data[start + RECORD.size : end]
        start = end


def _parsed(data: memoryview, start: int):
    """The schema, channel and message records in `data`, those inside chunks included."""
    for _, opcode, body in _framed(data, start):
        if opcode == OP_CHUNK:
            yield from _parsed(memoryview(_chunk_records(body)), 0)
        elif opcode == OP_MESSAGE:
            yield Message.read(ReadDataStream(io.BytesIO(body)), len(body))
        elif opcode in (OP_SCHEMA, OP_CHANNEL):
            yield (Schema if opcode == OP_SCHEMA else Channel).read(ReadDataStream(io.BytesIO(body)))


def _chunk_records(body: memoryview) -> bytes:
    """A chunk's records, decompressed and checked against the chunk's size and CRC."""
    try:
        _, _, size, crc = CHUNK.unpack_from(body)
        (name_length,) = struct.unpack_from("<I", body, CHUNK.size)
        at = CHUNK.size + 4 + name_length
        compression = bytes(body[CHUNK.size + 4 : at]).decode()
        (length,) = struct.unpack_from("<Q", body, at)
    except (struct.error, UnicodeDecodeError):
        raise McapDamage("corrupt MCAP chunk header") from None
    data = body[at + 8 : at + 8 + length]
    if compression not in DECOMPRESS:
        raise McapDamage(f"unsupported MCAP chunk compression {compression[:20]!r}")
    try:
        records = DECOMPRESS[compression](data)
    except Exception as exc:  # each decompressor has its own error types for corrupt input
        raise McapDamage(f"corrupt MCAP chunk: {compression} data does not decompress ({exc})") from None
    if len(data) != length or len(records) != size:
        raise McapDamage(f"corrupt MCAP chunk: {len(records)} bytes, its header says {size}")
    if crc and zlib.crc32(records) != crc:
        raise McapDamage("corrupt MCAP: a chunk does not match its CRC")
    return records
