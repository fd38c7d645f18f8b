"""Authentication, roles, TLS and private files, against real server processes."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq
from torch_tq import InvalidArgument, PermissionDenied, Unauthenticated
from torch_tq.protocol import actions as registry
from torch_tq.server.security import security_from

from .certs import make_pki

TOKENS = {"reader": "r" * 24, "writer": "w" * 24, "ops": "a" * 24}
ROLE_OF = {"reader": "read", "writer": "write", "ops": "admin"}


def _write_tokens(path, grants, mode=0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write("# identity role token\n\n")
        for identity, token in grants.items():
            f.write(f"{identity} {ROLE_OF.get(identity, 'read')} {token}\n")
    os.chmod(path, mode)
    return str(path)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    path = _write_tokens(tmp_path_factory.mktemp("auth") / "tokens", TOKENS)
    with torch_tq.start_server(storage="memory", auth_tokens=path, session_ttl_s=1.5,
                               qps=0) as srv:
        yield srv


def _raw(srv) -> flight.FlightClient:
    return flight.connect(srv.location)


def _bearer(token: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", b"Bearer " + token.encode())],
                                    timeout=20)


def _every_call(conn: flight.FlightClient, options) -> dict:
    """Every Flight method and every registered action, made once: name -> what it raised
    (None: it went through)."""
    read = json.dumps({"action": "ReadMatrix", "index_id": 1, "matrix_type": "x"}).encode()
    write = flight.FlightDescriptor.for_command(json.dumps(
        {"action": "WriteMatrix", "index_id": 777, "matrix_type": "x", "dtype": "float32",
         "shape": [2]}))
    table = pa.table({"data": pa.array([1.0, 2.0], pa.float32())})

    def put():
        writer, _ = conn.do_put(write, table.schema, options)
        writer.write_table(table)
        writer.close()

    calls = {
        "ListFlights": lambda: list(conn.list_flights(b"", options)),
        "GetFlightInfo": lambda: conn.get_flight_info(
            flight.FlightDescriptor.for_command(read), options),
        "GetSchema": lambda: conn.get_schema(flight.FlightDescriptor.for_command(read), options),
        "DoGet": lambda: conn.do_get(flight.Ticket(read), options).read_all(),
        "DoPut": put,
        "DoExchange": lambda: conn.do_exchange(flight.FlightDescriptor.for_command(b"{}"),
                                               options)[1].read_all(),
        "ListActions": lambda: list(conn.list_actions(options)),
    }
    for name in registry.ACTIONS:
        calls[name] = lambda name=name: list(conn.do_action(flight.Action(name, b"{}"), options))
    raised = {}
    for name, call in calls.items():
        try:
            call()
            raised[name] = None
        except Exception as e:  # noqa: BLE001 - what each raised is the point
            raised[name] = e
    return raised


def _expired_session(srv) -> flight.FlightCallOptions:
    conn = _raw(srv)
    header = conn.authenticate_basic_token("reader", TOKENS["reader"])
    options = flight.FlightCallOptions(headers=[header], timeout=20)
    assert list(conn.list_actions(options))  # live at first
    time.sleep(1.7)  # the server's session_ttl_s is 1.5
    return options


@pytest.mark.parametrize("credential", ["missing", "wrong", "expired", "basic on a call"])
def test_every_method_and_action_refuses_a_bad_credential(secured, credential):
    if credential == "missing":
        options = flight.FlightCallOptions(timeout=20)
    elif credential == "wrong":
        options = _bearer("x" * 24)
    elif credential == "expired":
        options = _expired_session(secured)
    else:  # basic credentials are for the handshake alone
        import base64
        basic = base64.b64encode(f"ops:{TOKENS['ops']}".encode())
        options = flight.FlightCallOptions(headers=[(b"authorization", b"Basic " + basic)])
    raised = _every_call(_raw(secured), options)
    assert len(raised) == 7 + len(registry.ACTIONS)
    for name, error in raised.items():
        # (pyarrow's client raises GetSchema's refusal as a plain OSError)
        assert isinstance(error, (flight.FlightUnauthenticatedError, OSError)), (name, error)
        text = str(error)
        assert text.startswith("UNAUTHENTICATED: missing or invalid credentials"), (name, text)
        for leak in ("torch_tq", "Traceback", "/", "Python", TOKENS["ops"]):
            assert leak not in text.split(". gRPC client debug context")[0], (name, text)
    # nothing was stored by the refused DoPut
    ops = torch_tq.Client(secured.location, token=TOKENS["ops"], transport="grpc")
    assert not _exists(ops, 777, "x")


def _exists(client, index_id: int, matrix_type: str) -> bool:
    try:
        client.get(index_id, matrix_type)
    except torch_tq.NotFound:
        return False
    return True


def _denied(raised: dict) -> set[str]:
    for name, error in raised.items():
        assert not str(error).startswith("UNAUTHENTICATED"), (name, error)
    return {name for name, error in raised.items()
            if str(error).startswith("PERMISSION_DENIED")}


def test_roles_decide_what_a_caller_may_do(secured):
    writes = {a.name for a in registry.ACTIONS.values() if a.role == "write"} | {"DoPut"}
    admins = {a.name for a in registry.ACTIONS.values() if a.role == "admin"}
    assert admins == {"Stats", "DeleteGroup"}
    assert {"DeleteMatrix", "FinishStream", "UcxPut", "PublishLocal"} <= writes
    for identity, denied in (("reader", writes | admins), ("writer", admins), ("ops", set())):
        raised = _every_call(_raw(secured), _bearer(TOKENS[identity]))
        assert _denied(raised) == denied, identity
        for name in denied:
            text = str(raised[name])
            assert text.startswith("PERMISSION_DENIED: "), text
            assert f"{identity} has {ROLE_OF[identity]}" in text


def test_typed_errors_and_nothing_changed_for_a_forbidden_call(secured):
    writer = torch_tq.Client(secured.location, token=TOKENS["writer"], transport="grpc")
    reader = torch_tq.Client(secured.location, token=TOKENS["reader"], transport="grpc")
    writer.put(5, "prompt", torch.arange(6.0))
    assert torch.equal(reader.get(5, "prompt"), torch.arange(6.0))
    with pytest.raises(PermissionDenied) as info:
        reader.put(5, "prompt", torch.zeros(6))
    assert isinstance(info.value, PermissionError) and info.value.code == "PERMISSION_DENIED"
    with pytest.raises(PermissionDenied):
        reader.delete(5)
    results = reader.put_many({(6, "prompt"): torch.ones(2)})
    assert [r.code for r in results] == ["PERMISSION_DENIED"]
    with pytest.raises(PermissionDenied):
        writer.server_stats()
    assert torch.equal(reader.get(5, "prompt"), torch.arange(6.0))  # unchanged
    assert not _exists(reader, 6, "prompt")
    # a Consume that also deletes is a write
    writer.put(7, "reward", torch.ones(1))
    lease = reader.consume("g-sec", ["reward"], max_items=1, timeout=5)
    assert lease.index_ids == [7]
    with pytest.raises(PermissionDenied):
        reader.consume("g-sec", ["reward"], max_items=1, ack=[7], delete=True)
    with pytest.raises(PermissionDenied):
        reader.ack("g-sec", [7], delete=True)
    assert _exists(reader, 7, "reward")
    reader.ack("g-sec", [7])  # consuming without deleting is a read
    with pytest.raises(Unauthenticated) as info:
        torch_tq.Client(secured.location, token="n" * 20, transport="grpc").get(5, "prompt")
    assert isinstance(info.value, PermissionError)
    assert torch_tq.Client(secured.location, token=TOKENS["ops"]).server_stats()[
        "errors"].get("UNAUTHENTICATED", 0) >= 1


def test_the_token_comes_from_the_environment_and_survives_pickling(secured, monkeypatch):
    import pickle

    monkeypatch.setenv("TORCH_TQ_TOKEN", TOKENS["writer"])
    client = torch_tq.Client(secured.location, transport="grpc")
    client.put(8, "prompt", torch.ones(3))
    monkeypatch.delenv("TORCH_TQ_TOKEN")
    again = pickle.loads(pickle.dumps(client))  # a DataLoader worker's copy
    assert torch.equal(again.get(8, "prompt"), torch.ones(3))
    assert TOKENS["writer"] not in repr(client.connection.credentials)


def test_stock_flight_clients_log_in_with_basic_credentials(secured):
    conn = _raw(secured)
    name, value = conn.authenticate_basic_token("writer", TOKENS["writer"])
    assert name == b"authorization" and value.startswith(b"Bearer ")
    assert value[7:] not in {t.encode() for t in TOKENS.values()}  # a session of its own
    options = flight.FlightCallOptions(headers=[(name, value)])
    reply = list(conn.do_action(flight.Action("Health", b"{}"), options))
    assert json.loads(reply[0].body.to_pybytes())["status"] == "SERVING"
    for user, token in (("writer", TOKENS["reader"]), ("nobody", TOKENS["writer"]),
                        ("writer", "")):
        with pytest.raises(flight.FlightUnauthenticatedError):
            conn.authenticate_basic_token(user, token)


def test_the_token_file_must_be_private_and_well_formed(tmp_path):
    open_path = _write_tokens(tmp_path / "open", TOKENS, mode=0o644)
    with pytest.raises(InvalidArgument, match="chmod 600"):
        torch_tq.start_server(storage="memory", auth_tokens=open_path)
    for text, why in (("reader read short\n", "16-512"), ("reader boss " + "t" * 20, "role"),
                      ("only two\n", "expected"), (f"a read {'t' * 20}\nb read {'t' * 20}\n",
                                                   "twice"), ("# nothing\n", "grants nothing")):
        path = tmp_path / "bad"
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(InvalidArgument, match=why) as info:
            torch_tq.start_server(storage="memory", auth_tokens=str(path))
        assert "t" * 20 not in str(info.value)  # a token never appears in a message


def test_sighup_reloads_the_token_file(tmp_path):
    path = _write_tokens(tmp_path / "tokens", {"writer": TOKENS["writer"]})
    with torch_tq.start_server(storage="memory", auth_tokens=path) as srv:
        old = torch_tq.Client(srv.location, token=TOKENS["writer"], transport="grpc",
                              retry_deadline=0)
        old.put(1, "x", torch.ones(1))
        _write_tokens(path, {"writer": "n" * 30})
        os.kill(srv.pid, signal.SIGHUP)
        new = torch_tq.Client(srv.location, token="n" * 30, transport="grpc")
        deadline = time.monotonic() + 20
        while True:
            try:
                new.get(1, "x")
                break
            except Unauthenticated:
                assert time.monotonic() < deadline, "the new token never took effect"
                time.sleep(0.05)
        with pytest.raises(Unauthenticated):
            old.get(1, "x")
        # a file that no longer loads leaves the grants in force
        (tmp_path / "tokens").write_text("garbage\n")
        os.kill(srv.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert srv.alive
        assert torch.equal(new.get(1, "x"), torch.ones(1))


def test_the_quota_follows_the_token_not_the_client_id_header(tmp_path):
    path = _write_tokens(tmp_path / "tokens", {"writer": TOKENS["writer"]})
    with torch_tq.start_server(storage="memory", auth_tokens=path, qps=20,
                               qps_burst=5) as srv:
        conn = _raw(srv)
        refused = 0
        for i in range(40):
            headers = [(b"authorization", b"Bearer " + TOKENS["writer"].encode()),
                       (b"x-tq-client-id", f"fresh-{i}".encode())]
            try:
                list(conn.do_action(flight.Action("Health", b"{}"),
                                    flight.FlightCallOptions(headers=headers)))
            except flight.FlightUnavailableError as e:
                assert "retry_after_ms" in str(e)
                refused += 1
        assert refused >= 20  # 40 calls at once against a burst of 5 and 20/s


def test_a_server_other_hosts_reach_needs_authentication(tmp_path):
    for host in ("0.0.0.0", "10.1.2.3", "::", "tq-node-0"):
        with pytest.raises(InvalidArgument, match="without authentication"):
            security_from(host)
    with pytest.raises(InvalidArgument, match="without authentication"):
        torch_tq.start_server(host="0.0.0.0", storage="memory")
    assert security_from("10.1.2.3", insecure=True).auth is None
    path = _write_tokens(tmp_path / "tokens", TOKENS)
    assert security_from("10.1.2.3", auth_tokens=path).auth is not None
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert security_from(host).auth is None


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def test_tls_round_trip_and_what_it_refuses(pki):
    with torch_tq.start_server(storage="memory", tls_cert=pki["server_pem"],
                               tls_key=pki["server_key"]) as srv:
        assert srv.location.startswith("grpc+tls://127.0.0.1:")
        client = torch_tq.Client(srv.location, tls_root_certs=pki["ca_pem"], transport="grpc")
        value = torch.randn(64, 1024)
        client.put(1, "prompt", value)
        assert torch.equal(client.get(1, "prompt"), value)
        assert [r.success for r in client.put_many({(2, "a"): value[:3], (3, "a"): value[3:]})]
        assert torch.equal(client.get_many([(3, "a")])[0].tensor, value[3:])
        # a client that does not trust the server's CA, or speaks plaintext, gets nothing
        for location, roots in ((srv.location, None),
                                (srv.location.replace("grpc+tls", "grpc"), None)):
            with pytest.raises(torch_tq.Unavailable):
                torch_tq.Client(location, tls_root_certs=roots, transport="grpc",
                                retry_deadline=0, connect_timeout=0).get(1, "prompt")


def test_mutual_tls_takes_only_certificates_its_ca_signed(pki):
    with torch_tq.start_server(storage="memory", tls_cert=pki["server_pem"],
                               tls_key=pki["server_key"], tls_client_ca=pki["ca_pem"],
                               qps=20, qps_burst=5) as srv:
        client = torch_tq.Client(srv.location, tls_root_certs=pki["ca_pem"],
                                 tls_cert=pki["client_pem"], tls_key=pki["client_key"],
                                 transport="grpc")
        client.put(1, "x", torch.ones(4))
        assert torch.equal(client.get(1, "x"), torch.ones(4))
        for cert in ("rogue", None):
            extra = {"tls_cert": pki[f"{cert}_pem"], "tls_key": pki[f"{cert}_key"]} if cert else {}
            with pytest.raises(torch_tq.Unavailable):
                torch_tq.Client(srv.location, tls_root_certs=pki["ca_pem"], transport="grpc",
                                retry_deadline=0, connect_timeout=0, **extra).get(1, "x")
        # the certificate's subject is the quota identity: a fresh client-id header per
        # call does not buy a fresh quota
        time.sleep(0.5)
        with open(pki["ca_pem"], "rb") as ca, open(pki["client_pem"], "rb") as cert, \
                open(pki["client_key"], "rb") as key:
            conn = flight.FlightClient(srv.location, tls_root_certs=ca.read(),
                                       cert_chain=cert.read(), private_key=key.read())
        refused = 0
        for i in range(40):
            options = flight.FlightCallOptions(headers=[(b"x-tq-client-id", f"f-{i}".encode())])
            try:
                list(conn.do_action(flight.Action("Health", b"{}"), options))
            except flight.FlightUnavailableError:
                refused += 1
        assert refused >= 20


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("storage", ["disk", "memory"])
def test_stored_files_are_the_server_users_alone(tmp_path, storage):
    data_dir = str(tmp_path / "store") if storage == "disk" else None
    with torch_tq.start_server(storage=storage, data_dir=data_dir) as srv:
        client = torch_tq.Client(srv.location, transport="same-host")
        client.put(1, "prompt", torch.randn(256, 1024))  # 1 MiB: a file of its own
        info = client.connection.action("LocalInfo", {"host_id": _host_id()}, "local info")
        root = info["root"]
        assert _mode(root) == 0o700
        files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        dirs = [os.path.join(d, s) for d, ss, _ in os.walk(root) for s in ss]
        assert files and dirs
        for path in files:
            assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
        for path in dirs:
            assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
        if os.geteuid() != 0:
            pytest.skip("needs root to act as another user")
        # another user can reach none of it, and its client falls back to the network
        from torch_tq.transport import same_host as local

        target = next(p for p in files if p.endswith(".arrow"))
        pid = os.fork()
        if pid == 0:  # the child touches files only, never gRPC
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    open(target, "rb").read(1)
                except PermissionError:
                    code = 0 if local.attach(info, 1 << 20) is None else 3
                else:
                    code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def _host_id() -> str:
    from torch_tq.transport import same_host as local

    return local.host_id()


def test_error_messages_name_nothing_inside_the_server(tmp_path):
    """What a client of any language reads: the code and message, no class of ours, no
    path, no traceback."""
    with torch_tq.start_server(storage="disk", data_dir=str(tmp_path / "store")) as srv:
        conn = _raw(srv)
        read = json.dumps({"action": "ReadMatrix", "index_id": 1, "matrix_type": "x"})
        calls = {
            "NOT_FOUND": lambda: conn.do_get(flight.Ticket(read.encode())).read_all(),
            "INVALID_ARGUMENT": lambda: conn.do_get(flight.Ticket(b"{bad")).read_all(),
            "unknown action": lambda: list(conn.do_action(flight.Action("Nope", b""))),
            "DoExchange": lambda: conn.do_exchange(
                flight.FlightDescriptor.for_command(b"{}"))[1].read_all(),
        }
        for name, call in calls.items():
            with pytest.raises(Exception) as info:  # noqa: PT011 - the text is the point
                call()
            text = str(info.value)
            assert not re.search(r"torch_tq\.[a-z_]", text), (name, text)  # no module of ours
            for leak in ("_Wire", "Traceback", str(tmp_path), "File \""):
                assert leak not in text, (name, text)


def test_the_dataset_the_sink_and_the_cli_pass_the_token_on(secured, tmp_path, monkeypatch):
    import subprocess
    import sys

    from torch_tq import TensorSink, TQDataset

    options = {"token": TOKENS["writer"], "transport": "grpc"}
    with TensorSink(secured.location, client_options=options) as sink:
        for i in range(4):
            sink.write(100 + i, {"sec": torch.full((3,), float(i))})
        sink.finish(["sec"])
    reader = {"token": TOKENS["reader"], "transport": "grpc"}
    ds = TQDataset(secured.location, ["sec"], index_ids=range(100, 104), client_options=reader)
    # a DataLoader worker in a process of its own gets the token with the dataset
    got = {int(item["index_id"]): item["sec"] for item in ds.loader(batch_size=None,
                                                                  num_workers=1)}
    assert sorted(got) == [100, 101, 102, 103] and torch.equal(got[102], torch.full((3,), 2.0))
    with pytest.raises(Unauthenticated):
        next(iter(TQDataset(secured.location, ["sec"], index_ids=[100],
                            client_options={"transport": "grpc"})))
    export = str(tmp_path / "out.safetensors")
    env = {**os.environ, "TORCH_TQ_TOKEN": TOKENS["reader"]}
    cli = [sys.executable, "-m", "torch_tq"]
    done = subprocess.run(cli + ["export", export, "--ids", "100,101", "--location",
                                 secured.location], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.path.getsize(export) > 0
    done = subprocess.run(cli + ["ls", "--location", secured.location, "--no-retry"],
                          capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TORCH_TQ_TOKEN"})
    assert done.returncode == 5 and "UNAUTHENTICATED" in done.stderr, done.stderr
    done = subprocess.run(cli + ["rm", "100", "--location", secured.location, "--token",
                                 TOKENS["reader"], "--no-retry"], capture_output=True,
                          text=True)
    assert done.returncode == 6 and "PERMISSION_DENIED" in done.stderr, done.stderr
