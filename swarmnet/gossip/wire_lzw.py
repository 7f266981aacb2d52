"""LZW as Go's compress/lzw (LSB order, 8-bit literals) reads and writes it: memberlist's
only compression algorithm, for packets and streams alike. Pure."""

from __future__ import annotations

from swarmnet.gossip.messages import DecodeError

_LZW_CLEAR = 256
_LZW_EOF = 257
_LZW_MAX_CODE = 4095  # 12-bit codes


def lzw_compress(data: bytes) -> bytes:
    """Byte-identical to Go 1.19's ``lzw.NewWriter(w, lzw.LSB, 8)``: a clear code first
    (Go >= 1.17), variable width 9..12 bits, a clear when the table is full, EOF, LSB-first."""
    out = bytearray()
    bits = nbits = 0
    width, hi, overflow = 9, _LZW_EOF, 512
    table: dict[int, int] = {}

    def emit(code: int) -> None:
        nonlocal bits, nbits
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8

    def inc_hi() -> bool:
        """Advance the next free code; True when the table was full and got cleared."""
        nonlocal hi, width, overflow
        hi += 1
        if hi == overflow:
            width += 1
            overflow <<= 1
        if hi == _LZW_MAX_CODE:
            emit(_LZW_CLEAR)
            width, hi, overflow = 9, _LZW_EOF, 512
            table.clear()
            return True
        return False

    emit(_LZW_CLEAR)
    if data:
        code = data[0]
        for literal in data[1:]:
            key = code << 8 | literal
            hit = table.get(key)
            if hit is not None:
                code = hit
                continue
            emit(code)
            code = literal
            if not inc_hi():
                table[key] = hi
        emit(code)
        inc_hi()
    emit(_LZW_EOF)
    if nbits > 0:
        out.append(bits & 0xFF)
    return bytes(out)


def lzw_decompress(data: bytes, limit: int) -> bytes:
    """Go's LZW reader; raises ``bad_compression`` for a corrupt or unterminated stream and
    ``oversized`` past ``limit`` output bytes (LZW expands up to ~4000x: a bomb guard)."""
    out = bytearray()
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b"", b""]
    table += [b""] * (_LZW_MAX_CODE + 1 - len(table))
    bits = nbits = 0
    width, hi, overflow = 9, _LZW_EOF, 512
    last = -1  # no previous code (start, after clear, or table full)
    pos = 0
    while True:
        while nbits < width:
            if pos >= len(data):
                raise DecodeError("bad_compression", "LZW stream ends without EOF")
            bits |= data[pos] << nbits
            pos += 1
            nbits += 8
        code = bits & ((1 << width) - 1)
        bits >>= width
        nbits -= width
        if code == _LZW_CLEAR:
            width, hi, overflow, last = 9, _LZW_EOF, 512, -1
            continue
        if code == _LZW_EOF:
            return bytes(out)
        if code < hi or (code == hi and last < 0):
            entry = table[code]  # code == hi here only once the 12-bit table is full
        elif code == hi:
            prev = table[last]
            entry = prev + prev[:1]
        else:
            raise DecodeError("bad_compression", "invalid LZW code")
        out += entry
        if len(out) > limit:
            raise DecodeError("oversized", "decompressed data over the limit")
        if last >= 0:
            table[hi] = table[last] + entry[:1]
        last = code
        hi += 1
        if hi >= overflow:
            if width == 12:
                last = -1
                hi -= 1
            else:
                width += 1
                overflow <<= 1
