"""No bytes from a caller reach UCX unchecked: the worker-address layout check, and a fuzz
of UcxGet/UcxPut addresses against a live server that must stay up and answer."""

from __future__ import annotations

import base64
import json
import os
import random
import struct
import subprocess
import sys

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import given, settings, strategies as st

from torch_tq.transport import ucx_address
from torch_tq.errors import InvalidArgument

ucxx = pytest.importorskip("ucxx")

import torch  # noqa: E402

import torch_tq  # noqa: E402
from torch_tq.transport import ucx  # noqa: E402
from tests.conftest import ucx_locations  # noqa: E402


@pytest.fixture(scope="module")
def addresses() -> list[bytes]:
    return ucx.runtime().addresses


def test_real_addresses_parse_to_their_end(addresses):
    for address in addresses:
        parsed = ucx_address.parse(address)
        assert parsed.version == ucx_address.VERSION_V1  # what UCX packs by default
        assert parsed.transports  # at least one interface


def test_version_2_addresses_parse_too():
    code = "from torch_tq.transport import ucx; import sys; sys.stdout.write(ucx.runtime().addresses_b64[0])"
    env = dict(os.environ, UCX_ADDRESS_VERSION="v2", TORCH_TQ_UCX_LANES="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         timeout=120, check=True).stdout
    parsed = ucx_address.parse(base64.b64decode(out.split()[-1]))
    assert parsed.version == ucx_address.VERSION_V2


def test_every_truncation_and_extension_is_refused(addresses):
    address = addresses[0]
    for n in range(len(address)):
        with pytest.raises(InvalidArgument):
            ucx_address.parse(address[:n])
    for tail in (b"\x00", b"\xff", b"\x00" * 64):
        with pytest.raises(InvalidArgument, match="after the end"):
            ucx_address.parse(address + tail)


def test_what_ucx_would_assert_on_is_refused(addresses):
    address = bytearray(addresses[0])
    for version in range(2, 16):  # UCX asserts the version is 1 or 2
        bad = bytes([(address[0] & 0xF0) | version]) + bytes(address[1:])
        with pytest.raises(InvalidArgument, match="version"):
            ucx_address.parse(bad)
    with pytest.raises(InvalidArgument, match="header flags"):
        ucx_address.parse(b"\x51\x80" + bytes(address[1:]))  # v2 with an unknown flag
    with pytest.raises(InvalidArgument):
        ucx_address.parse(bytes(300))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_are_refused_cleanly(data):
    try:
        ucx_address.parse(data)
    except InvalidArgument:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_any_mutation_of_a_real_address_parses_or_is_refused_cleanly(addresses, data):
    address = bytearray(data.draw(st.sampled_from(addresses)))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(address) - 1))
        address[pos] = data.draw(st.integers(0, 255))
    try:
        ucx_address.parse(bytes(address))
    except InvalidArgument:
        pass


# --------------------------------------------------------------------------- live fuzz


ID = 880_000_000


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A server whose log the fuzz reads afterwards, and a UCX client with a matrix on it."""
    log_path = tmp_path_factory.mktemp("ucx_fuzz") / "server.log"
    with open(log_path, "wb") as log_file:
        srv = torch_tq.start_server(storage="memory", stderr=log_file,
                                    qps_ucx=0, qps=0)  # the fuzz is not about quotas
    with torch_tq.Client(ucx_locations(srv.location), transport="ucx") as c:
        c.put(ID, "prompt", torch.arange(1000, dtype=torch.float32))
        yield srv, c, log_path
    srv.stop()


def _call(fc, action: str, address_field) -> str:
    body = {"index_id": ID, "matrix_type": "prompt", "addresses": address_field, "tag": 7}
    if action == "UcxGet":
        body["inline_max"] = 1 << 20  # the matrix comes back inline: only the address matters
    else:
        body.update(shape=[0], dtype="float32", nbytes=0, parts=[], index_id=ID + 1)
    try:
        list(fc.do_action(flight.Action(action, json.dumps(body).encode())))
        return "ok"
    except (flight.FlightError, pa.ArrowException) as e:
        text = str(e)
        assert text.startswith("INVALID_ARGUMENT: "), text
        return "refused"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _cases(address: bytes, rng: random.Random) -> list[tuple[str, object]]:
    cases: list[tuple[str, object]] = []
    cases += [("random", [_b64(rng.randbytes(rng.choice([2, 40, 300, 1000]))) ])
              for _ in range(200)]
    cases += [("truncated", [_b64(address[:n])]) for n in range(0, len(address))]
    for bit in range(len(address) * 8):
        flipped = bytearray(address)
        flipped[bit // 8] ^= 1 << (bit % 8)
        cases.append(("bit-flipped", [_b64(bytes(flipped))]))
    cases += [
        ("oversized", [_b64(address + rng.randbytes(9000))]),
        ("oversized", [_b64(rng.randbytes(6000))]),
        ("oversized", [_b64(address)] * 17),  # more lanes than anyone runs
        ("oversized", "A" * 20000),
        ("malformed", ["not base64!"]),
        ("malformed", [""]),
        ("malformed", []),
        ("malformed", [_b64(bytes(300))]),
        ("malformed", [7]),
    ]
    return cases


def _procfs_file_address(address: bytes, fd: int) -> bytes:
    """The address with its posix shared-memory segment (``/proc/<pid>/fd/<fd>``, UCX's
    procfs mode: pid in bits 0-29, fd in 30-59, flag bit 63) pointed at another descriptor
    of this process: well formed, but UCX maps that file as the peer's message queue."""
    pid = os.getpid()
    for pos in range(len(address) - 7):
        (value,) = struct.unpack_from("<Q", address, pos)
        if value >> 63 and value & ((1 << 30) - 1) == pid:
            value = (value & ~(((1 << 30) - 1) << 30)) | (fd << 30)
            return address[:pos] + struct.pack("<Q", value) + address[pos + 8:]
    pytest.skip("no posix procfs segment in this address (UCX_POSIX_USE_PROC_LINK=n?)")


@pytest.mark.slow
def test_fuzzed_addresses_never_take_the_server_down(fuzzed, addresses):
    srv, c, log_path = fuzzed
    rng = random.Random(13)
    fc = flight.FlightClient(srv.location)
    counts: dict[str, dict[str, int]] = {}
    for action in ("UcxGet", "UcxPut"):
        for kind, field in _cases(addresses[0], rng):
            outcome = _call(fc, action, field)
            row = counts.setdefault(f"{action} {kind}", {"tried": 0, "refused": 0})
            row["tried"] += 1
            row["refused"] += outcome == "refused"
        assert srv.alive, f"the server died during the {action} fuzz"
    print("\nfuzz:", json.dumps(counts, indent=1))
    for kind in ("random", "truncated", "oversized", "malformed"):
        for action in ("UcxGet", "UcxPut"):
            row = counts[f"{action} {kind}"]
            assert row["refused"] == row["tried"], (action, kind, row)
    # the server answers, and real UCX clients still move data
    health = json.loads(list(fc.do_action(flight.Action("Health", b"")))[0].body.to_pybytes())
    assert health["status"] == "SERVING"
    assert torch.equal(c.get(ID, "prompt"), torch.arange(1000, dtype=torch.float32))
    big = torch.arange(1 << 20, dtype=torch.float32)
    c.put(ID + 2, "prompt", big)
    assert torch.equal(c.get(ID + 2, "prompt"), big)
    log = log_path.read_text()
    assert "Traceback" not in log and "failed (ref" not in log, log[-3000:]


def test_an_address_that_kills_ucx_is_tried_in_a_probe_not_the_server(fuzzed, addresses, tmp_path):
    srv, c, log_path = fuzzed
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with open(empty, "rb") as f:  # a descriptor of this process the address will name:
        # UCX maps the empty file as a message queue and dies of SIGBUS touching it
        bad = _procfs_file_address(addresses[0], f.fileno())
        fc = flight.FlightClient(srv.location)
        before = _stats(fc)["ucx_address_probe"]
        for action in ("UcxGet", "UcxPut"):
            assert _call(fc, action, [_b64(bad)]) == "refused"
        after = _stats(fc)["ucx_address_probe"]
    assert srv.alive
    assert after["helper_deaths"] >= before["helper_deaths"] + 2  # SIGBUS, in the probe
    assert torch.equal(c.get(ID, "prompt"), torch.arange(1000, dtype=torch.float32))
    assert "Traceback" not in log_path.read_text()


def _stats(fc) -> dict:
    return json.loads(list(fc.do_action(flight.Action("Stats", b"")))[0].body.to_pybytes())
