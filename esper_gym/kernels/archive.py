"""A strict reader and a canonical writer for the zip archives torch.export and torch.save write.

Python's `zipfile` and torch's own reader (miniz) do not agree on every archive: torch looks
members up case-insensitively, the two may pick different central directories when a file holds
two, and `zipfile` tolerates data before the first member or after the end record. A validator
that reads with one and a loader that reads with the other can therefore check one archive and
load another. So validation reads with `read_members`, which accepts only the plain layout torch
writes and refuses everything else *from the central directory, before reading any data*, and
loading gets `pack_members`' fresh archive of exactly the bytes that were validated.

Accepted layout, nothing before, between or after:
    [local header, stored data, optional data descriptor] * n
    central directory (n entries)
    optional zip64 end record + zip64 locator (torch always writes them)
    end-of-central-directory record, no comment
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

# Kernel artifacts are tens of KB to a few MB; anything far beyond is refused unread.
MAX_ARCHIVE_BYTES = 64 * 2**20
MAX_MEMBERS = 256

_EOCD = struct.Struct("<4sHHHHIIH")  # sig, disk, cd disk, n here, n total, cd size, cd off, comment
_Z64_LOCATOR = struct.Struct("<4sIQI")  # sig, disk, zip64 record offset, disks
_Z64_RECORD = struct.Struct("<4sQHHIIQQQQ")  # sig, size, ver, ver, disk, cd disk, n, n, size, off
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_FLAG_ENCRYPTED = 0x1
_FLAG_DESCRIPTOR = 0x8
_FLAG_UTF8 = 0x800
_ALLOWED_FLAGS = _FLAG_DESCRIPTOR | _FLAG_UTF8


class ArchiveRejected(ValueError):
    """The bytes are not an archive in the plain layout torch writes; nothing was loaded."""


def _refuse(where: str, why: str) -> ArchiveRejected:
    return ArchiveRejected(f"{where}: {why}")


def _end_records(data: bytes, where: str) -> tuple[int, int, int]:
    """(entry count, central directory offset, where the central directory must end)."""
    if len(data) < _EOCD.size or data[-_EOCD.size : -_EOCD.size + 4] != b"PK\x05\x06":
        raise _refuse(where, "no end-of-central-directory record at the end (trailing data?)")
    eocd_at = len(data) - _EOCD.size
    _, disk, cd_disk, n_here, n_total, cd_size, cd_off, comment = _EOCD.unpack_from(data, eocd_at)
    if comment or disk or cd_disk or n_here != n_total:
        raise _refuse(where, "archive comment or multi-disk end record")
    cd_end = eocd_at
    loc_at = eocd_at - _Z64_LOCATOR.size
    if loc_at >= 0 and data[loc_at : loc_at + 4] == b"PK\x06\x07":
        _, _, record_at, disks = _Z64_LOCATOR.unpack_from(data, loc_at)
        if disks != 1 or record_at != loc_at - _Z64_RECORD.size:
            raise _refuse(where, "zip64 locator does not point right before itself")
        sig, size, _, _, disk, cd_disk, n64, n64_total, cd_size64, cd_off64 = (
            _Z64_RECORD.unpack_from(data, record_at)
        )
        if sig != b"PK\x06\x06" or size != _Z64_RECORD.size - 12 or disk or cd_disk:
            raise _refuse(where, "malformed zip64 end record")
        if n64 != n64_total or any(
            short not in (full, mask)
            for short, full, mask in (
                (n_total, n64, 0xFFFF),
                (cd_size, cd_size64, 0xFFFFFFFF),
                (cd_off, cd_off64, 0xFFFFFFFF),
            )
        ):
            raise _refuse(where, "zip64 end record disagrees with the end record")
        n_total, cd_size, cd_off = n64, cd_size64, cd_off64
        cd_end = record_at
    if cd_off + cd_size != cd_end:
        raise _refuse(where, "data between the central directory and the end record")
    if n_total > MAX_MEMBERS:
        raise _refuse(where, f"{n_total} members, at most {MAX_MEMBERS} allowed")
    return n_total, cd_off, cd_end


def _central_entries(data: bytes, where: str) -> tuple[list[tuple[str, int, int, int]], int]:
    """(name, crc, size, local header offset) per entry, all checked before any data is read,
    and the central directory's offset."""
    count, cd_off, cd_end = _end_records(data, where)
    pos = cd_off
    entries, seen = [], set()
    for _ in range(count):
        if pos + _CENTRAL.size > cd_end or data[pos : pos + 4] != b"PK\x01\x02":
            raise _refuse(where, "malformed central directory")
        fields = _CENTRAL.unpack_from(data, pos)
        flags, method, crc, csize, size = fields[3], fields[4], fields[7], fields[8], fields[9]
        name_len, extra_len, comment_len, disk, offset = (*fields[10:14], fields[16])
        raw_name = data[pos + _CENTRAL.size : pos + _CENTRAL.size + name_len]
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if pos > cd_end:
            raise _refuse(where, "central directory runs past its end")
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise _refuse(where, f"non-ASCII member name {raw_name!r}") from None
        if flags & ~_ALLOWED_FLAGS or flags & _FLAG_ENCRYPTED:
            raise _refuse(where, f"member {name!r} has unsupported flags {flags:#x}")
        if method != zipfile.ZIP_STORED:
            # torch writes stored members; a compressed one could be a decompression bomb.
            raise _refuse(where, f"member {name!r} is compressed (method {method})")
        if csize != size or size >= 0xFFFFFFFF or offset >= 0xFFFFFFFF or disk:
            raise _refuse(where, f"member {name!r} declares sizes a stored member cannot have")
        if size > len(data):
            raise _refuse(where, f"member {name!r} declares {size} bytes, the file has {len(data)}")
        # torch's reader finds members case-insensitively: two names that differ only in case
        # would let it load a member the validator never looked at.
        if name.lower() in seen:
            raise _refuse(where, f"duplicate member name {name!r} (names are case-insensitive)")
        seen.add(name.lower())
        entries.append((name, crc, size, offset))
    if pos != cd_end:
        raise _refuse(where, "central directory has trailing bytes")
    return entries, cd_off


def read_members(data: bytes, where: str = "archive") -> dict[str, bytes]:
    """Every member's bytes, in archive order, from an archive in the plain torch layout.

    Refused (ArchiveRejected) before any member data is read: more than MAX_ARCHIVE_BYTES, a
    missing or commented end record, data before the first member, between members, or after
    the end record, a second central directory, compressed or encrypted members, sizes that do
    not fit the file, more than MAX_MEMBERS members, non-ASCII names, and names that are equal
    ignoring case. Then each member's local header must repeat its central entry and its CRC
    must match.
    """
    if len(data) > MAX_ARCHIVE_BYTES:
        raise _refuse(where, f"{len(data)} bytes, at most {MAX_ARCHIVE_BYTES} allowed")
    entries, cd_off = _central_entries(data, where)
    members: dict[str, bytes] = {}
    pos = 0
    for name, crc, size, offset in sorted(entries, key=lambda e: e[3]):
        if offset != pos:
            raise _refuse(where, f"member {name!r} is not where the previous one ended")
        if data[pos : pos + 4] != b"PK\x03\x04" or pos + _LOCAL.size > cd_off:
            raise _refuse(where, f"member {name!r}: malformed local header")
        fields = _LOCAL.unpack_from(data, pos)
        flags, method, (lcrc, lcsize, lsize, name_len, extra_len) = fields[2], fields[3], fields[6:]
        start = pos + _LOCAL.size + name_len + extra_len
        if data[pos + _LOCAL.size : pos + _LOCAL.size + name_len] != name.encode():
            raise _refuse(where, f"member {name!r}: local header names another member")
        if method != zipfile.ZIP_STORED or flags & ~_ALLOWED_FLAGS:
            raise _refuse(where, f"member {name!r}: local header disagrees with the directory")
        if not flags & _FLAG_DESCRIPTOR and (lcrc, lcsize, lsize) != (crc, size, size):
            raise _refuse(where, f"member {name!r}: local header disagrees with the directory")
        end = start + size
        if end > cd_off:
            raise _refuse(where, f"member {name!r} runs into the central directory")
        content = data[start:end]
        if zlib.crc32(content) != crc:
            raise _refuse(where, f"CRC check failed for member {name!r}")
        pos = end
        if flags & _FLAG_DESCRIPTOR:
            pos = _skip_descriptor(data, pos, cd_off, crc, size, name, where)
        members[name] = content
    if pos != cd_off:
        raise _refuse(where, "data between the last member and the central directory")
    return {name: members[name] for name, *_ in entries}


def _skip_descriptor(
    data: bytes, pos: int, limit: int, crc: int, size: int, name: str, where: str
) -> int:
    for layout in ("<4sIII", "<4sIQQ"):  # 32-bit sizes, or zip64 sizes
        fmt = struct.Struct(layout)
        if pos + fmt.size <= limit:
            sig, dcrc, dcsize, dsize = fmt.unpack_from(data, pos)
            if sig == b"PK\x07\x08" and (dcrc, dcsize, dsize) == (crc, size, size):
                return pos + fmt.size
    raise _refuse(where, f"member {name!r}: data descriptor missing or disagrees")


def pack_members(members: dict[str, bytes]) -> bytes:
    """A fresh archive of exactly `members` (stored, in the given order), for torch to load."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, content in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, content)
    return buffer.getvalue()
