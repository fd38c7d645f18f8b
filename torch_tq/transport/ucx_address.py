"""Strict validation of UCX worker addresses before UCX sees them.

UCX parses a worker address (``ucp_address_unpack``, ucp/wireup/address.c) without any
bounds check and asserts on what it does not expect: 300 random bytes given to
``create_endpoint_from_worker_address`` abort the whole process (``Assertion
'*addr_version == UCP_OBJECT_VERSION_V2' failed``). So the server walks every address a
caller sends through the same layout here first, and refuses it with
:class:`~torch_tq.errors.InvalidArgument` unless every field lies inside the buffer, the
buffer ends exactly where the layout does, and every value UCX would act on is one it can
handle. Only then does the address reach UCX.

The layout (non-unified mode, as UCX runs by default; a worker address carries no
endpoint addresses). Version 1 is what UCX packs unless ``UCX_ADDRESS_VERSION=v2``::

    header      u8   version (4 low bits: 0 is v1, 1 is v2) | v1: flags (4 high bits)
                                                             v2: release (4 high bits)
                v2 only: u8 flags        flags: DEBUG_INFO 1, WORKER_UUID 2, CLIENT_ID 4,
                                                AM_ONLY 8
    [uuid u64]  [client_id u64]  [name: u8 length + bytes, if DEBUG_INFO]
    0xFF (no device) | devices:
      md        u8   EMPTY_DEV 0x80 | md_index (v2: 0x7F means the index follows in a byte)
      dev_len   u8   LAST 0x80 | NUM_PATHS 0x40 | SYS_DEVICE 0x20 | length (v2: 0x1F: follows)
      [num_paths u8] [sys_dev u8] dev_addr[length]
      ifaces (none if EMPTY_DEV), until one has LAST:
        tl_name_csum u16
        attr   v1: overhead f32, bandwidth f32, lat_ovh f32, prio_cap_flags u32
               v2: overhead fp8, bandwidth fp8, latency fp8, prio u8, seg_size u16, flags u16
        if_len u8: LAST 0x80 | HAS_EP_ADDR 0x40 | length (v2: 0x3F: follows); if_addr[length]
    (an empty last device carries the peer's release version in its md index)

What this cannot judge is the meaning of the transport-specific bytes (a device's IP, a
shared-memory segment id): those reach UCX's transports, which check them against the
system (an unreachable peer is an error UCX reports, not an abort).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from torch_tq.errors import InvalidArgument

VERSION_V1 = 0  # ucp_object_version_t: UCP_OBJECT_VERSION_V1
VERSION_V2 = 1
FLAG_DEBUG_INFO = 0x01
FLAG_WORKER_UUID = 0x02
FLAG_CLIENT_ID = 0x04
FLAG_AM_ONLY = 0x08
KNOWN_HEADER_FLAGS = FLAG_DEBUG_INFO | FLAG_WORKER_UUID | FLAG_CLIENT_ID | FLAG_AM_ONLY
NULL_RESOURCE = 0xFF
MD_EMPTY_DEV = 0x80
MD_MASK = 0x7F
DEV_LAST = 0x80
DEV_NUM_PATHS = 0x40
DEV_SYS_DEVICE = 0x20
DEV_LEN_MASK = 0x1F
IF_LAST = 0x80
IF_HAS_EP_ADDR = 0x40
IF_LEN_MASK = 0x3F
MAX_RESOURCES = 128  # UCP_MAX_RESOURCES: interfaces in one address
MAX_MDS = 64  # md indexes are bits of a 64-bit map
MAX_ADDRESS_BYTES = 8192
_FP8_EXPONENT_MASK = 0x0F
_FP8_NAN = 0x0F


@dataclass(frozen=True)
class WorkerAddress:
    """What a valid address says, for the caller's own checks."""

    version: int
    flags: int
    devices: int
    transports: frozenset[int]  # the tl name checksums of its interfaces


class _Reader:
    def __init__(self, data: bytes, extended: bool) -> None:
        self.data = data
        self.pos = 0
        self._extended = extended  # v2 lengths and indexes may spill into a second byte

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _bad(f"truncated in {what} (byte {self.pos} of {len(self.data)})")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def peek(self, what: str) -> int:
        if self.pos >= len(self.data):
            raise _bad(f"truncated before {what}")
        return self.data[self.pos]

    def field(self, mask: int, what: str) -> tuple[int, int]:
        """(the flag bits of the byte, its value: the masked bits, or in v2 the next byte
        when they are all set)."""
        byte = self.u8(what)
        value = byte & mask
        if self._extended and value == mask:
            value = self.u8(what)
        return byte & ~mask & 0xFF, value


def _bad(detail: str) -> InvalidArgument:
    return InvalidArgument(f"invalid UCX worker address: {detail}")


def _fp8_finite(value: int) -> bool:
    return value & _FP8_EXPONENT_MASK != _FP8_NAN


def _fp8_positive(value: int) -> bool:
    exponent = value & _FP8_EXPONENT_MASK
    return exponent != 0 and exponent != _FP8_NAN


def _check_attr_v1(attr: bytes) -> None:
    overhead, bandwidth, lat_ovh = struct.unpack_from("<fff", attr)
    if not all(math.isfinite(v) for v in (overhead, bandwidth, lat_ovh)):
        raise _bad("an interface with a non-finite attribute")
    if bandwidth == 0:  # negative is an old peer's "shared" bandwidth, which UCX takes
        raise _bad("an interface with no bandwidth")


def _check_attr_v2(attr: bytes) -> None:
    overhead, bandwidth, latency = attr[0], attr[1], attr[2]
    if not _fp8_positive(bandwidth):
        raise _bad("an interface with no bandwidth")
    if not (_fp8_finite(overhead) and _fp8_finite(latency)):
        raise _bad("an interface with an undefined overhead or latency")


_ATTRS = {VERSION_V1: (16, _check_attr_v1), VERSION_V2: (8, _check_attr_v2)}


def parse(data: bytes) -> WorkerAddress:
    """Checks a packed UCX worker address (see the module docstring).

    Args:
        data: the address bytes as the peer sent them.

    Raises:
        InvalidArgument: anything UCX could misread or assert on.
    """
    if not isinstance(data, (bytes, bytearray)) or not 2 <= len(data) <= MAX_ADDRESS_BYTES:
        raise _bad(f"must be 2 to {MAX_ADDRESS_BYTES} bytes")
    data = bytes(data)
    version = data[0] & 0x0F
    if version not in _ATTRS:
        raise _bad(f"unknown version {version}")
    r = _Reader(data, extended=version == VERSION_V2)
    header = r.u8("header")
    flags = header >> 4 if version == VERSION_V1 else r.u8("header flags")
    if flags & ~KNOWN_HEADER_FLAGS:
        raise _bad(f"unknown header flags {flags:#04x}")
    if flags & FLAG_WORKER_UUID:
        r.take(8, "worker uuid")
    if flags & FLAG_CLIENT_ID:
        r.take(8, "client id")
    if flags & FLAG_DEBUG_INFO:
        r.take(r.u8("worker name length"), "worker name")
    attr_bytes, check_attr = _ATTRS[version]
    transports: set[int] = set()
    devices = ifaces = 0
    if r.peek("the device list") == NULL_RESOURCE:
        r.u8("the device list")
    else:
        last_dev = False
        while not last_dev:
            md_flags, md_index = r.field(MD_MASK, "md index")
            empty = bool(md_flags & MD_EMPTY_DEV)
            dev_flags, dev_len = r.field(DEV_LEN_MASK, "device address length")
            last_dev = bool(dev_flags & DEV_LAST)
            if not (empty and last_dev) and md_index >= MAX_MDS:
                raise _bad(f"md index {md_index} (at most {MAX_MDS - 1})")
            if dev_flags & DEV_NUM_PATHS:
                paths = r.u8("number of paths")
                if not 1 <= paths <= 64:
                    raise _bad(f"{paths} paths on a device")
            if dev_flags & DEV_SYS_DEVICE:
                r.u8("system device")
            r.take(dev_len, "device address")
            devices += 1
            last_if = empty
            while not last_if:
                ifaces += 1
                if ifaces > MAX_RESOURCES:
                    raise _bad(f"more than {MAX_RESOURCES} interfaces")
                csum = int.from_bytes(r.take(2, "transport name checksum"), "little")
                check_attr(r.take(attr_bytes, "interface attributes"))
                if_flags, if_len = r.field(IF_LEN_MASK, "interface address length")
                if if_flags & IF_HAS_EP_ADDR:
                    raise _bad("a worker address carries no endpoint addresses")
                last_if = bool(if_flags & IF_LAST)
                r.take(if_len, "interface address")
                transports.add(csum)
    if r.pos != len(r.data):
        raise _bad(f"{len(r.data) - r.pos} bytes after the end of the address")
    return WorkerAddress(version, flags, devices, frozenset(transports))
