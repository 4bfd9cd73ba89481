"""NSM tokens and mutual TLS against real Go code: golang-jwt v4, grpc-go and crypto/tls.

NSM's sdk is Go. This builds the small Go program next to this file (`nsminterop/`, from
Debian's packaged Go sources: no module proxy needed) and checks, both ways, that what the proxy
signs, sends and accepts is what a Go peer signs, sends and accepts:

* tokens: a Python token verifies with golang-jwt and reads back the same claims; a token Go
  makes for the same sub/aud/exp has a byte-identical header and payload; a Go token verifies
  with `proxy.security.tokens.verify`; expiry texts (`time.RFC3339Nano`) parse both ways;
* a grpc-go client over a UNIX socket with mutual TLS calls the proxy's real target endpoint
  (`proxy.nsm.endpoint.TargetEndpoint` with its `Signer`, addresses faked, NOOP mechanism):
  Request and Close with Go-signed tokens pass, bad tokens are PERMISSION_DENIED with the policy
  that failed, foreign certificates are refused both ways;
* the project's client (`proxy.rpc.open_channel`, `SpiffeTls`, `hoptoken.sign_request`) calls
  a grpc-go server, which checks the token with golang-jwt as an NSM server would;
* the registry's `path` metadata (wire-api §2.5): our JSON against encoding/json over the sdk's
  grpcmetadata.Path, both ways; the proxy's `RegistryClient` registers, refreshes and
  unregisters with a grpc-go registry that updates the path as the sdk's updatepath server does;
  a grpc-go client playing the sdk's registry client does the same with the lab registry.

Run from the repository root (Debian packages: golang-go golang-github-golang-jwt-jwt-dev
golang-google-grpc-dev):

    .venv/bin/python -m interop.go.check        # or: .venv/bin/python interop/go/check.py

Each check prints PASS or FAIL with its figures. DIFF lines are where the proxy does not do
what Go (or the sdk, read from its source) does, in a way a Go NSM peer's own traffic never
meets: texts Go's Format (or json.Marshal) never writes, metadata the sdk's clients always send
once. They are listed again at the end and do not fail the run.
Exit status: 0 all passed, 1 a check failed, 2 the Go toolchain or packages are missing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from ipaddress import ip_interface
from pathlib import Path
from typing import Any, Literal

import attrs
import trio
from cryptography.hazmat.primitives import serialization
from loguru import logger

from proxy.api.networkservice import networkservice_grpc
from proxy.api.networkservice.connection_pb2 import Connection, Mechanism, PathSegment
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry.registry_pb2 import NetworkServiceEndpoint
from proxy.kernel.model import IPInterface
from proxy.kernel.router import RouterEvent
from proxy.lab.nsm.forwarding import NoKernel
from proxy.lab.nsm.server import serve_nsm
from proxy.lab.spiffe_ca import LabCa
from proxy.nsm.endpoint import TargetEndpoint
from proxy.nsm.hoptoken import Signer, sign_request
from proxy.nsm.registry_client import RegistryClient
from proxy.rpc import RpcFailedError, Server, StatusCode, open_channel
from proxy.security.spiffe import Identity
from proxy.security.tls import SpiffeTls
from proxy.security.tokens import (
    EXPIRES_KEY,
    PATH_KEY,
    TOKEN_KEY,
    RegistryPath,
    Token,
    TokenError,
    format_rfc3339nano,
    generate,
    parse_registry_path,
    parse_rfc3339nano,
    registry_path_json,
    verify,
)
from proxy.watched import Watched

HERE = Path(__file__).resolve().parent
GO_SOURCE = HERE / "nsminterop"
GOCODE = Path("/usr/share/gocode")
APT_PACKAGES = "golang-go golang-github-golang-jwt-jwt-dev golang-google-grpc-dev"

DOMAIN = "lab.example"
SERVICE = "proxy.conduit-a.trench-a.red"
ENDPOINT_NAME = "proxy-a"
LB_KEYS = "proxy-a-conduit-a.trench-a.red-"
LIFETIME = timedelta(minutes=10)
NS = 1_000_000_000
REQUEST = "/networkservice.NetworkService/Request"
CLOSE = "/networkservice.NetworkService/Close"
GATEWAYS: frozenset[IPInterface] = frozenset(
    {ip_interface("198.18.1.1/24"), ip_interface("2001:db8:1::1/64")}
)


# --- reporting -----------------------------------------------------------------------------------


class Report:
    """Every check's verdict, printed as it is made."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed = 0
        self.diffs: list[str] = []

    def check(self, name: str, ok: bool, figures: str = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  [{figures}]" if figures else ""))
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)
        return ok

    def diff(self, name: str, figures: str) -> None:
        """Where we do something else than the Go sdk, without a Go peer being refused."""
        print(f"DIFF  {name}  [{figures}]")
        self.diffs.append(f"{name}: {figures}")

    def note(self, text: str) -> None:
        print(f"      {text}")

    @contextmanager
    def group(self, name: str) -> Iterator[None]:
        """A group of checks; an exception in it is one failure, and the run goes on."""
        print(f"\n== {name}")
        try:
            yield
        except Exception as exc:
            self.check(f"{name}: ran to the end", False, f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stdout)


# --- the Go program ------------------------------------------------------------------------------


class Missing(Exception):
    """The Go toolchain or a Go package is not installed."""


def build(workdir: Path) -> tuple[Path, float]:
    """Build nsminterop in GOPATH mode against Debian's Go sources; the binary and seconds taken.

    No module proxy: GOPATH lists a private tree holding our package and /usr/share/gocode; the
    go.mod next to main.go only makes the go command map golang-jwt's ".../v4" import path onto
    Debian's un-suffixed directory. Build cache and all go in `workdir`.
    """
    go = shutil.which("go") or "/usr/lib/go/bin/go"
    if not Path(go).exists():
        raise Missing(f"no go command; apt-get install -y {APT_PACKAGES}")
    for package in ("github.com/golang-jwt/jwt", "google.golang.org/grpc"):
        if not (GOCODE / "src" / package).is_dir():
            raise Missing(f"no {package} under {GOCODE}; apt-get install -y {APT_PACKAGES}")
    source = workdir / "gopath" / "src" / "nsminterop"
    shutil.copytree(GO_SOURCE, source)
    binary = workdir / "nsminterop"
    env = {
        **os.environ,
        "GOPATH": f"{workdir / 'gopath'}:{GOCODE}",
        "GO111MODULE": "off",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOCACHE": str(workdir / "gocache"),
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    started = time.monotonic()
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        raise RuntimeError(f"go build failed:\n{built.stderr}")
    return binary, time.monotonic() - started


def runtime_version() -> str:
    go = shutil.which("go")
    if not go:
        return "go ?"
    return subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True).stdout.strip()


def versions() -> str:
    """The Go and Debian package versions this run used."""
    found = []
    go = shutil.which("go")
    if go:
        found.append(subprocess.run([go, "version"], capture_output=True, text=True).stdout.strip())
    for package in ("golang-github-golang-jwt-jwt-dev", "golang-google-grpc-dev"):
        shown = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
        )
        found.append(f"{package} {shown.stdout.strip() or '?'}")
    return "; ".join(found)


@attrs.frozen
class Go:
    binary: Path

    def run(self, *args: str, stdin: str = "") -> dict[str, Any]:
        """A sign/verify/times command's result (its one JSON line)."""
        done = subprocess.run(
            [str(self.binary), *args], input=stdin, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"nsminterop {args[0]} failed: {done.stderr.strip()}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result


# --- identities ----------------------------------------------------------------------------------


@attrs.frozen
class Party:
    """One workload: its identity and the PEM files the Go side reads."""

    identity: Identity
    cert: str  # chain, leaf first
    key: str
    bundle: str

    @property
    def id(self) -> str:
        return str(self.identity.spiffe_id)

    @property
    def tls_args(self) -> list[str]:
        return ["-cert", self.cert, "-key", self.key, "-bundle", self.bundle]


def party(directory: Path, identity: Identity, bundle_pem: bytes) -> Party:
    directory.mkdir(mode=0o700)
    cert, key, bundle = directory / "svid.pem", directory / "svid.key", directory / "bundle.pem"
    cert.write_bytes(identity.svid.chain_pem())
    key.touch(mode=0o600)
    key.write_bytes(identity.svid.key_pem())
    bundle.write_bytes(bundle_pem)
    return Party(identity, str(cert), str(key), str(bundle))


@attrs.frozen
class Lab:
    proxy: Party  # the proxy: its endpoint's identity, and the client towards the Go server
    go_client: Party  # a Go NSM client (a target's NSC, or nsmgr forwarding one)
    go_server: Party  # a Go NSM server (nsmgr, as the proxy's calls reach it; a Go registry)
    nsmgr: Party  # the lab's registry (proxy.lab.nsm), which Go registers with
    thief: Party  # another workload of the trust domain
    stranger: Party  # "/go-nsc" again, but issued by a CA nobody here trusts (trusting ours)
    stranger_trust: Party  # the Go client's own SVID, but trusting only that other CA


def make_lab(workdir: Path) -> Lab:
    ca, other = LabCa.create(DOMAIN), LabCa.create(DOMAIN)
    pem = ca.certificate.public_bytes(serialization.Encoding.PEM)
    other_pem = other.certificate.public_bytes(serialization.Encoding.PEM)
    ids = workdir / "ids"
    ids.mkdir(mode=0o700)
    go_client = ca.identity("/go-nsc")
    return Lab(
        proxy=party(ids / "proxy", ca.identity("/proxy"), pem),
        go_client=party(ids / "go-nsc", go_client, pem),
        go_server=party(ids / "go-nsmgr", ca.identity("/go-nsmgr"), pem),
        nsmgr=party(ids / "nsmgr", ca.identity("/nsmgr"), pem),
        thief=party(ids / "thief", ca.identity("/thief"), pem),
        stranger=party(ids / "stranger", other.identity("/go-nsc"), pem),
        stranger_trust=party(ids / "stranger-trust", go_client, other_pem),
    )


# --- helpers -------------------------------------------------------------------------------------


def b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims_text(sub: object, aud: object, exp: object) -> str:
    return f"sub={sub} aud={aud} exp={exp}"


def python_token(signer: Party, peer: Party) -> Token:
    return generate(
        signer.identity.svid.key,
        own_id=signer.id,
        own_not_after=signer.identity.svid.not_after,
        now=datetime.now(UTC),
        max_lifetime=LIFETIME,
        peer_id=peer.id,
        peer_not_after=peer.identity.svid.not_after,
    )


# --- tokens --------------------------------------------------------------------------------------


def token_checks(report: Report, go: Go, lab: Lab) -> None:
    server, client = lab.proxy, lab.go_client
    ours = python_token(server, client)
    expires_text = format_rfc3339nano(ours.expires)
    expires_ns = parse_rfc3339nano(expires_text)
    header_b64, claims_b64, signature_b64 = ours.value.split(".")

    with report.group("Python token -> Go (golang-jwt v4)"):
        seen = go.run("verify", "-cert", server.cert, "-expires", expires_text, stdin=ours.value)
        report.check("golang-jwt verifies our ES256 token", seen["ok"], seen.get("error", ""))
        report.check(
            "the claims Go reads are ours",
            (seen.get("sub"), tuple(seen.get("aud") or ()), seen.get("exp"))
            == (ours.claims.sub, ours.claims.aud, ours.claims.exp),
            claims_text(seen.get("sub"), seen.get("aud"), seen.get("exp")),
        )
        report.check(
            "the header Go reads is {alg: ES256, typ: JWT}",
            seen.get("header") == {"alg": "ES256", "typ": "JWT"},
            json.dumps(seen.get("header")),
        )
        report.check(
            "Go parses our nsm-client-token-expires with time.RFC3339Nano",
            seen.get("expires_unix_nano") == expires_ns,
            f"{expires_text} -> {seen.get('expires_unix_nano')} ns; ours {expires_ns} ns",
        )
        wrong_key = go.run("verify", "-cert", client.cert, stdin=ours.value)
        report.check(
            "golang-jwt refuses it with another certificate's key",
            not wrong_key["ok"],
            wrong_key.get("error", "accepted!"),
        )
        forged_claims = b64encode(
            json.dumps({"sub": lab.thief.id, "aud": [client.id], "exp": ours.claims.exp}).encode()
        )
        forged = go.run(
            "verify",
            "-cert",
            server.cert,
            stdin=f"{header_b64}.{forged_claims}.{signature_b64}",
        )
        report.check(
            "golang-jwt refuses it with the claims changed",
            not forged["ok"],
            forged.get("error", "accepted!"),
        )

    with report.group("Go token (as spiffejwt makes it) -> Python"):
        signed = go.run(
            "sign", "-key", server.key, "-sub", server.id, "-aud", client.id, "-exp", expires_text
        )
        go_header, go_claims, go_signature = signed["token"].split(".")
        same_header = go_header == header_b64
        same_claims = go_claims == claims_b64
        report.check(
            "header part byte-identical",
            same_header,
            b64decode(go_header).decode()
            + ("" if same_header else f" vs ours {b64decode(header_b64).decode()}"),
        )
        report.check(
            "claims part byte-identical (same sub/aud/exp)",
            same_claims,
            b64decode(go_claims).decode()
            + ("" if same_claims else f" vs ours {b64decode(claims_b64).decode()}"),
        )
        report.check(
            "signatures are raw r||s, 64 bytes, base64url unpadded, on both sides",
            len(b64decode(go_signature)) == len(b64decode(signature_b64)) == 64
            and "=" not in go_signature + signature_b64
            and len(go_signature) == len(signature_b64) == 86,
            f"go {len(go_signature)} chars, ours {len(signature_b64)} chars",
        )
        claims = verify(signed["token"], server.identity.svid.leaf.public_key())
        report.check(
            "proxy.security.tokens.verify accepts the Go token, same claims",
            claims == ours.claims,
            claims_text(claims.sub, claims.aud, claims.exp),
        )
        report.check(
            "Go formats the expiry it was given exactly as we do",
            signed["expires"] == expires_text,
            f"go {signed['expires']}, ours {expires_text}",
        )
        raw = bytearray(b64decode(go_signature))
        raw[5] ^= 0x01
        refused = ""
        try:
            verify(
                f"{go_header}.{go_claims}.{b64encode(bytes(raw))}",
                server.identity.svid.leaf.public_key(),
            )
        except TokenError as exc:
            refused = str(exc)
        report.check(
            "we refuse the Go token with one signature bit flipped", bool(refused), refused
        )

        fresh = go.run("sign", "-key", client.key, "-sub", client.id, "-aud", server.id)
        fresh_claims = verify(fresh["token"], client.identity.svid.leaf.public_key())
        fresh_ns = parse_rfc3339nano(fresh["expires"])
        report.check(
            "we parse the expiry of a token Go made on its own clock; exp is it truncated",
            fresh_claims.exp == fresh_ns // NS
            and abs(fresh_ns / NS - (time.time() + LIFETIME.total_seconds())) < 60,
            f"{fresh['expires']} -> {fresh_ns} ns; exp {fresh_claims.exp}",
        )
        fresh_digits = fresh["expires"].partition(".")[2].rstrip("Z")
        report.note(f"Go's expiry carries {len(fresh_digits)} fraction digits (time.Now)")
        no_aud = go.run("sign", "-key", client.key, "-sub", client.id)
        no_aud_claims = verify(no_aud["token"], client.identity.svid.leaf.public_key())
        report.check(
            "without a TLS peer Go leaves aud out, and so do we",
            no_aud_claims.aud is None
            and b64decode(no_aud["token"].split(".")[1])
            == json.dumps(
                {"sub": client.id, "exp": no_aud_claims.exp}, separators=(",", ":")
            ).encode(),
            b64decode(no_aud["token"].split(".")[1]).decode(),
        )

    with report.group("RFC 3339 with nanoseconds, both ways (Go time.RFC3339Nano)"):
        now_ns = time.time_ns()
        instants = [
            1_700_000_000 * NS,  # a whole second: no fraction, no dot
            1_700_000_000 * NS + 100_000_000,  # trailing zeros dropped
            1_700_000_000 * NS + 123_456_789,
            1_700_000_000 * NS + 1,
            1_700_000_000 * NS + 120_000,  # microseconds only, as a datetime gives
            now_ns,
            -1,  # before the epoch
        ]
        ours_text = [format_rfc3339nano(ns) for ns in instants]
        for zone in ("+05:30", "-08:00"):
            seen = go.run(
                "times",
                stdin=json.dumps({"format_ns": instants, "parse": ours_text, "zone": zone}),
            )
            if zone == "+05:30":
                mismatched = [
                    f"{ns}: go {g} ours {o}"
                    for ns, g, o in zip(instants, seen["formatted_utc"], ours_text, strict=True)
                    if g != o
                ]
                report.check(
                    f"our format equals Go's (UTC), {len(instants)} instants",
                    not mismatched,
                    "; ".join(mismatched) or f"e.g. {ours_text[2]}, {ours_text[0]}",
                )
                parsed = [p.get("unix_nano") for p in seen["parsed"]]
                report.check(
                    "Go parses every text we format to the same instant",
                    parsed == instants,
                    "" if parsed == instants else f"go {parsed} expected {instants}",
                )
            back = []
            for text in seen["formatted_zone"]:
                try:
                    back.append(parse_rfc3339nano(text))
                except ValueError as exc:
                    back.append(f"{text}: {exc}")  # type: ignore[arg-type]
            report.check(
                f"we parse Go's texts in zone {zone} to the same instant",
                back == instants,
                f"e.g. {seen['formatted_zone'][2]}"
                if back == instants
                else f"ours {back} expected {instants}",
            )
        odd_texts_checks(report, go)


def odd_texts_checks(report: Report, go: Go) -> None:
    """Texts no Go peer formats, parsed by both: a difference is only a DIFF. The verdicts are
    this Go's (1.19: the general layout parser only); Go 1.20 and later try a strict RFC 3339
    parser first and fall back to the general one, and that one dropped the limit of nine
    fraction digits (see README.md)."""
    texts = [
        "2025-01-02T03:04:05.1234567891Z",  # ten fraction digits
        "2025-01-02T03:04:05,5Z",  # a comma before the fraction
        "2025-01-02T03:04:05+24:00",
        "2025-01-02T03:04:05+00:60",
        "2025-01-02T3:04:05Z",  # a one-digit hour
        "2025-01-02t03:04:05z",
        "2025-01-02T03:04:05.Z",
        "2025-01-02T03:04:05",
        "2025-01-02 03:04:05Z",
        "2025-01-02T03:04:60Z",
    ]
    seen = go.run("times", stdin=json.dumps({"format_ns": [], "parse": texts, "zone": "Z"}))
    differences = []
    for text, go_result in zip(texts, seen["parsed"], strict=True):
        try:
            ours: int | str = parse_rfc3339nano(text)
        except ValueError:
            ours = "refused"
        theirs = go_result.get("unix_nano", "refused")
        if ours != theirs:
            differences.append(f"{text!r}: go {theirs}, ours {ours}")
    if differences:
        report.diff(
            f"odd RFC 3339 texts, never formatted by Go ({runtime_version()})",
            "; ".join(differences),
        )
    else:
        report.check(f"odd RFC 3339 texts: same verdicts as Go ({len(texts)})", True)


# --- Go client -> the proxy's endpoint -----------------------------------------------------------


@attrs.frozen
class Pair:
    src: tuple[IPInterface, ...]
    dst: tuple[IPInterface, ...]


class FakeAddresses:
    """IPAM stand-in: fixed documentation addresses (198.18.0.0/15, 2001:db8::/32)."""

    def __init__(self) -> None:
        self.released: list[str] = []

    async def allocate_pair(self, key: str) -> Pair:
        return Pair(
            (ip_interface("198.18.1.10/24"), ip_interface("2001:db8:1::a/64")),
            (ip_interface("198.18.1.11/24"), ip_interface("2001:db8:1::b/64")),
        )

    def release_later(self, key: str) -> None:
        self.released.append(key)


@attrs.frozen
class GoCall:
    result: dict[str, Any]
    response: bytes | None
    wall_ms: float

    @property
    def code(self) -> str:
        return str(self.result.get("code"))

    def figures(self) -> str:
        r = self.result
        text = f"code {r.get('code')}"
        if r.get("message"):
            text += f" {r['message']!r}"
        return text + (
            f"; call {r.get('call_ms')} ms (connect, TLS and call), process {self.wall_ms:.0f} ms"
        )


class GoClient:
    """Runs `nsminterop call` with files in a scratch directory."""

    def __init__(self, go: Go, scratch: Path, socket: Path) -> None:
        self.go, self.scratch, self.socket = go, scratch, socket
        self.count = 0

    async def call(
        self,
        who: Party,
        method: str,
        message: Any,
        metadata: Sequence[tuple[str, str]] | None,
        *extra: str,
    ) -> GoCall:
        self.count += 1
        request = self.scratch / f"request-{self.count}.bin"
        response = self.scratch / f"response-{self.count}.bin"
        request.write_bytes(message.SerializeToString())
        args = [
            str(self.go.binary),
            "call",
            *who.tls_args,
            "-socket",
            str(self.socket),
            "-method",
            method,
            "-in",
            str(request),
            "-out",
            str(response),
            *extra,
        ]
        if metadata is not None:
            pairs = self.scratch / f"metadata-{self.count}.json"
            pairs.write_text(json.dumps([list(pair) for pair in metadata]))
            args += ["-metadata", str(pairs)]
        started = time.monotonic()
        with trio.fail_after(30):
            done = await trio.run_process(
                args, capture_stdout=True, capture_stderr=True, check=False
            )
        wall_ms = (time.monotonic() - started) * 1000
        if done.returncode != 0:
            raise RuntimeError(f"nsminterop call failed: {done.stderr.decode().strip()}")
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
        body = response.read_bytes() if response.exists() else None
        return GoCall(result, body, wall_ms)


def nsc_request(conn_id: str, token: str = "", expires_ns: int = 0) -> NetworkServiceRequest:
    """A Go client's first Request: its own path segment (with its token, as the sdk's
    updatetoken client writes it) and a NOOP mechanism (no interface, no descriptors)."""
    connection = Connection(id=conn_id, network_service=SERVICE)
    segment = PathSegment(name="go-nsc", id=conn_id, token=token)
    if expires_ns:
        segment.expires.seconds, segment.expires.nanos = divmod(expires_ns, NS)
    connection.path.path_segments.append(segment)
    return NetworkServiceRequest(
        connection=connection, mechanism_preferences=[Mechanism(cls="LOCAL", type="NOOP")]
    )


def go_sign(go: Go, signer: Party, sub: str, aud: str, *extra: str) -> tuple[str, str]:
    signed = go.run("sign", "-key", signer.key, "-sub", sub, "-aud", aud, *extra)
    return signed["token"], signed["expires"]


async def endpoint_checks(report: Report, go: Go, lab: Lab, workdir: Path) -> None:
    socket = workdir / "sockets" / "endpoint.sock"
    tls = SpiffeTls(Watched(lab.proxy.identity))
    addresses = FakeAddresses()
    router_in, _router_out = trio.open_memory_channel[RouterEvent](100)
    endpoint = TargetEndpoint(
        name=ENDPOINT_NAME,
        service_name=SERVICE,
        mtu=1500,
        addresses=addresses,
        gateways=Watched(GATEWAYS),
        router=router_in,
        default_lifetime=LIFETIME.total_seconds(),
        allocation_timeout=5.0,
        reserved_prefix=LB_KEYS,
        signer=Signer.of(tls, LIFETIME.total_seconds()),
    )
    client = GoClient(go, workdir / "scratch", socket)
    go_nsc, proxy = lab.go_client, lab.proxy
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.run)
        await nursery.start(
            partial(Server(endpoint.servicers()).serve_unix, str(socket), ssl_context=tls.server())
        )
        try:
            with report.group("grpc-go client -> the proxy's endpoint (UNIX socket, mutual TLS)"):
                await request_and_close(report, go, client, lab, endpoint, addresses)
            with report.group("the endpoint refuses bad tokens from a Go client"):
                await refusals(report, go, client, lab)
            with report.group("sdk behaviour we do not copy (a Go NSM server would accept)"):
                await lenient_sdk(report, go, client, lab)
            with report.group("TLS refusals, both ways"):
                token, expires = go_sign(go, go_nsc, go_nsc.id, proxy.id)
                metadata = [(TOKEN_KEY, token), (EXPIRES_KEY, expires)]
                message = nsc_request("go-nsc-red-9", token, parse_rfc3339nano(expires))
                foreign = await client.call(lab.stranger, REQUEST, message, metadata)
                report.check(
                    "a Go client whose SVID is from an untrusted CA is refused",
                    foreign.code == "Unavailable" and not endpoint.connections,
                    foreign.figures(),
                )
                distrust = await client.call(lab.stranger_trust, REQUEST, message, metadata)
                report.check(
                    "the Go client refuses our endpoint when it does not trust our CA",
                    distrust.code == "Unavailable"
                    and "does not verify with the bundle" in str(distrust.result.get("message")),
                    distrust.figures(),
                )
        finally:
            nursery.cancel_scope.cancel()


async def request_and_close(
    report: Report,
    go: Go,
    client: GoClient,
    lab: Lab,
    endpoint: TargetEndpoint,
    addresses: FakeAddresses,
) -> None:
    go_nsc, proxy = lab.go_client, lab.proxy
    token, expires = go_sign(go, go_nsc, go_nsc.id, proxy.id)
    expires_ns = parse_rfc3339nano(expires)
    metadata = [(TOKEN_KEY, token), (EXPIRES_KEY, expires)]
    first = await client.call(
        go_nsc, REQUEST, nsc_request("go-nsc-red-0", token, expires_ns), metadata
    )
    report.check("Request with a Go-signed token succeeds", first.code == "OK", first.figures())
    result = first.result
    report.check(
        "grpc-go sees our endpoint's SVID and ALPN h2",
        result.get("peer_id") == proxy.id and result.get("alpn") == "h2",
        f"peer {result.get('peer_id')}, ALPN {result.get('alpn')!r}, {result.get('tls_version')}",
    )
    if first.response is None:
        report.check("an answer came back", False)
        return
    answer = Connection.FromString(first.response)
    segments = answer.path.path_segments
    report.check(
        "the answer's path: index 0, our segment appended, the Go token in segment 0",
        answer.path.index == 0
        and len(segments) == 2
        and segments[0].token == token
        and segments[1].name == ENDPOINT_NAME
        and answer.id == "go-nsc-red-0",
        f"index {answer.path.index}, segments {[s.name for s in segments]}",
    )
    sent_stamp = divmod(expires_ns, NS)
    kept_stamp = (segments[0].expires.seconds, segments[0].expires.nanos)
    report.check(
        "segment 0 expires is the Go expiry to the nanosecond (as the sdk's updatetoken keeps it)",
        kept_stamp == sent_stamp,
        f"Go sent {expires} = {sent_stamp}; we stored {kept_stamp}",
    )
    ours = segments[1].token
    ours_claims = verify(ours, proxy.identity.svid.leaf.public_key())
    report.check(
        "our segment's token is for the Go client (aud from its TLS leaf)",
        ours_claims.sub == proxy.id and ours_claims.aud == (go_nsc.id,),
        claims_text(ours_claims.sub, ours_claims.aud, ours_claims.exp),
    )
    seen = go.run("verify", "-cert", proxy.cert, stdin=ours)
    report.check(
        "golang-jwt verifies the token our endpoint signed for the Go client",
        seen["ok"] and seen.get("aud") == [go_nsc.id],
        seen.get("error") or claims_text(seen.get("sub"), seen.get("aud"), seen.get("exp")),
    )

    # A refresh through per-RPC credentials that sign for the TLS peer they find, in a zone
    # other than UTC: what the sdk's client does in a pod whose local time is not UTC.
    again_request = NetworkServiceRequest(
        connection=answer, mechanism_preferences=[Mechanism(cls="LOCAL", type="NOOP")]
    )
    refresh = await client.call(go_nsc, REQUEST, again_request, None, "-sign", "-zone", "+05:30")
    report.check(
        "Request signed by grpc-go per-RPC credentials (aud from our TLS leaf, +05:30 expiry)",
        refresh.code == "OK",
        refresh.figures() + f"; sent expires {refresh.result.get('sent_expires')}",
    )
    sent = refresh.result.get("sent_token", "")
    sent_claims = verify(sent, go_nsc.identity.svid.leaf.public_key()) if sent else None
    report.check(
        "grpc-go learned our SPIFFE ID from the handshake for aud",
        sent_claims is not None and sent_claims.aud == (proxy.id,),
        f"aud {sent_claims.aud if sent_claims else None}",
    )
    if refresh.response is not None:
        again = Connection.FromString(refresh.response)
        report.check(
            "the refresh keeps our segment's id (same connection at our hop)",
            again.path.path_segments[1].id == segments[1].id
            and again.path.path_segments[0].token == sent,
            f"our id {again.path.path_segments[1].id}",
        )

    token, expires = go_sign(go, go_nsc, go_nsc.id, proxy.id)
    answer.path.path_segments[0].token = token
    closed = await client.call(go_nsc, CLOSE, answer, [(TOKEN_KEY, token), (EXPIRES_KEY, expires)])
    report.check(
        "Close with a Go-signed token succeeds and the endpoint lets the connection go",
        closed.code == "OK" and not endpoint.connections and addresses.released == ["go-nsc-red-0"],
        closed.figures() + f"; released {addresses.released}",
    )


async def refusals(report: Report, go: Go, client: GoClient, lab: Lab) -> None:
    go_nsc, proxy = lab.go_client, lab.proxy
    token, expires = go_sign(go, go_nsc, go_nsc.id, proxy.id)
    header, claims, signature = token.split(".")
    payload = json.loads(b64decode(claims))
    payload["sub"] = lab.thief.id
    changed_claims = (
        f"{header}.{b64encode(json.dumps(payload, separators=(',', ':')).encode())}.{signature}"
    )
    raw = bytearray(b64decode(signature))
    raw[0] ^= 0x80
    flipped = f"{header}.{claims}.{b64encode(bytes(raw))}"
    stolen, _ = go_sign(go, lab.thief, go_nsc.id, proxy.id)
    elsewhere, _ = go_sign(go, go_nsc, go_nsc.id, lab.go_server.id)
    expired, expired_at = go_sign(
        go,
        go_nsc,
        go_nsc.id,
        proxy.id,
        "-exp",
        format_rfc3339nano(datetime.now(UTC) - timedelta(minutes=1)),
    )
    cases = [
        ("claims changed after signing", changed_claims, expires, "prev_token_signed"),
        ("one signature bit flipped", flipped, expires, "prev_token_signed"),
        ("signed by another workload's key", stolen, expires, "prev_token_signed"),
        ("aud is another workload", elsewhere, expires, "tokens_chained"),
        ("expired a minute ago", expired, expired_at, "tokens_expired"),
        ("expiry text is not RFC 3339", token, "tomorrow", "caller token"),
    ]
    for number, (what, bad, bad_expires, policy) in enumerate(cases):
        conn_id = f"go-nsc-red-{number + 1}"
        done = await client.call(
            go_nsc,
            REQUEST,
            nsc_request(conn_id, bad),
            [(TOKEN_KEY, bad), (EXPIRES_KEY, bad_expires)],
        )
        report.check(
            f"{what}: PERMISSION_DENIED ({policy})",
            done.code == "PermissionDenied" and policy in str(done.result.get("message")),
            done.figures(),
        )


async def lenient_sdk(report: Report, go: Go, client: GoClient, lab: Lab) -> None:
    """The sdk's updatetoken server only logs a warning when the token metadata is missing or
    not single, and goes on with the token the client wrote into its own path segment; its
    authorize then passes. Every Go NSM client sends the metadata, so this never refuses one."""
    go_nsc, proxy = lab.go_client, lab.proxy
    token, expires = go_sign(go, go_nsc, go_nsc.id, proxy.id)
    message = nsc_request("go-nsc-red-7", token, parse_rfc3339nano(expires))
    for what, metadata in (
        ("no token metadata, a valid token in segment 0", []),
        (
            "the token metadata twice",
            [(TOKEN_KEY, token), (TOKEN_KEY, token), (EXPIRES_KEY, expires)],
        ),
    ):
        done = await client.call(go_nsc, REQUEST, message, metadata)
        if done.code == "OK":
            report.check(f"{what}: accepted, as the sdk would", True, done.figures())
        else:
            report.diff(f"{what}: we refuse, the sdk would accept", done.figures())


# --- the proxy's client -> Go server -------------------------------------------------------------


class Lines:
    """Line reader over a trio byte stream (the Go server's stdout)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream, self.buffer = stream, b""

    async def next(self) -> dict[str, Any]:
        with trio.fail_after(10):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some()
                if not chunk:
                    raise EOFError("the Go server's output ended")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        event: dict[str, Any] = json.loads(line)
        return event


def proxy_request() -> NetworkServiceRequest:
    """The proxy's own first Request towards nsmgr (as an NSC of an LB service)."""
    conn_id = "proxy-a-conduit-a.trench-a.red-lb-a"
    connection = Connection(id=conn_id, network_service="lb.conduit-a.trench-a.red")
    connection.path.path_segments.append(PathSegment(name="proxy-a", id=conn_id))
    return NetworkServiceRequest(
        connection=connection, mechanism_preferences=[Mechanism(cls="LOCAL", type="NOOP")]
    )


@asynccontextmanager
async def go_server(go: Go, workdir: Path, report: Report, *args: str) -> AsyncIterator[Lines]:
    """A Go server command (`serve`, `registry`) running for the block: its output lines, from
    the first after "ready". It stops when its stdin closes; killed (by its pid) if it does not."""
    errors = workdir / "scratch" / f"{args[0]}.stderr"
    with errors.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [str(go.binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
    assert process.stdin is not None and process.stdout is not None
    lines = Lines(process.stdout)
    try:
        ready = await lines.next()
        if ready.get("event") != "ready":
            raise RuntimeError(f"the Go server did not start: {ready}")
        yield lines
    finally:
        await process.stdin.aclose()  # the Go server stops when its stdin closes
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()  # this process, by its own pid
            await process.wait()
        if process.returncode != 0:
            report.note(f"Go {args[0]} exit {process.returncode}: {errors.read_text().strip()}")


async def server_checks(report: Report, go: Go, lab: Lab, workdir: Path) -> None:
    socket = workdir / "sockets" / "go-nsmgr.sock"
    reply = Connection(id="answer-from-go", network_service="lb.conduit-a.trench-a.red")
    reply_file = workdir / "scratch" / "reply.bin"
    reply_file.write_bytes(reply.SerializeToString())
    serve = ("serve", *lab.go_server.tls_args, "-socket", str(socket), "-reply", str(reply_file))
    async with go_server(go, workdir, report, *serve) as lines:
        with report.group("the proxy's client -> grpc-go server (UNIX socket, mutual TLS)"):
            await client_calls(report, lab, socket, lines, reply)


async def client_calls(
    report: Report, lab: Lab, socket: Path, lines: Lines, reply: Connection
) -> None:
    proxy, server = lab.proxy, lab.go_server
    tls = SpiffeTls(Watched(proxy.identity))
    signer = Signer.of(tls, LIFETIME.total_seconds())
    async with open_channel(f"unix://{socket}", ssl_context=tls.client()) as channel:
        stub = networkservice_grpc.NetworkServiceStub(channel)
        message = proxy_request()
        metadata = sign_request(signer, message.connection, channel)
        started = time.monotonic()
        with trio.fail_after(10):
            answer = await stub.Request(message, metadata=metadata)
        elapsed = (time.monotonic() - started) * 1000
        event = await lines.next()
        report.check(
            "our Request passes the Go server's token check",
            event.get("event") == "call" and not event.get("denied"),
            f"call {elapsed:.1f} ms; {event.get('denied') or 'accepted'}",
        )
        seen = event.get("token", {})
        sent = dict(metadata)
        report.check(
            "golang-jwt verified our token against our TLS leaf; claims as sent",
            seen.get("ok") is True
            and seen.get("sub") == proxy.id
            and seen.get("aud") == [server.id]
            and seen.get("claims_json") == b64decode(sent[TOKEN_KEY].split(".")[1]).decode(),
            seen.get("error") or claims_text(seen.get("sub"), seen.get("aud"), seen.get("exp")),
        )
        report.check(
            "Go parsed our nsm-client-token-expires to the instant we meant",
            seen.get("expires_unix_nano") == parse_rfc3339nano(sent[EXPIRES_KEY]),
            f"{sent[EXPIRES_KEY]} -> {seen.get('expires_unix_nano')} ns",
        )
        report.check(
            "the Go server saw our SVID over ALPN h2",
            event.get("peer_id") == proxy.id and event.get("alpn") == "h2",
            f"peer {event.get('peer_id')}, ALPN {event.get('alpn')!r}, {event.get('tls_version')}",
        )
        report.check(
            "the Go server's answer arrives intact",
            answer == reply,
            f"id {answer.id!r}, {event.get('request_len')} request bytes",
        )
        report.check(
            "our path segment carries the same token as the metadata",
            message.connection.path.path_segments[0].token == sent[TOKEN_KEY],
        )

        try:
            with trio.fail_after(10):
                await stub.Request(proxy_request(), metadata=())
            refused = "accepted!"
            code = None
        except RpcFailedError as exc:
            refused = str(exc.status.status_message)
            code = exc.status.status_code
        event = await lines.next()
        report.check(
            "a Go PERMISSION_DENIED reaches our client with its message",
            code == StatusCode.PERMISSION_DENIED and refused == event.get("denied"),
            f"{code}: {refused!r}",
        )

    foreign_tls = SpiffeTls(
        Watched(
            Identity(
                LabCa.create(DOMAIN).issue("/proxy"),
                {DOMAIN: proxy.identity.own_bundle},
            )
        )
    )
    try:
        with trio.fail_after(10):
            async with open_channel(f"unix://{socket}", ssl_context=foreign_tls.client()) as ch:
                await networkservice_grpc.NetworkServiceStub(ch).Request(proxy_request())
        outcome = "accepted!"
    except (RpcFailedError, OSError, trio.BrokenResourceError) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    report.check(
        "the Go server refuses our client with an SVID from an untrusted CA",
        outcome != "accepted!",
        outcome[:160],
    )


# --- registry path metadata ----------------------------------------------------------------------

NSE_REGISTRY = "/registry.NetworkServiceEndpointRegistry/"
EMPTY_PATH = '{"Index":0,"PathSegments":null}'  # json.Marshal(&grpcmetadata.Path{})
NSE_URL = "tcp://198.18.0.1:5001"  # not unix://: that one would have to go as a descriptor
UINT32_MAX = 2**32 - 1

# Path texts json.Marshal writes (escapes included): we must read them as Go does.
GO_WRITTEN_PATHS: list[tuple[str, bytes]] = [
    ("the empty path", EMPTY_PATH.encode()),
    ("two segments", b'{"Index":0,"PathSegments":[{"token":"a.b.c"},{"token":"d.e.f"}]}'),
    ("uint32 max, an empty token", b'{"Index":4294967295,"PathSegments":[{"token":""}]}'),
    (
        "Go's escapes",
        rb'{"Index":1,"PathSegments":[{"token":"\u003c\u0026\u003e\u2028\u0008\"\\"}]}',
    ),
]
# Texts no Go peer writes: a different reading is a DIFF.
ODD_PATHS: list[tuple[str, bytes]] = [
    ("keys in other cases", b' {"index":1,"pathsegments":[{"TOKEN":"a"},{"Token":"b"}]} '),
    ("unknown fields", b'{"PathSegments":[{"token":"a","id":"x"}],"Extra":{"a":[1,null]}}'),
    ("an empty array", b'{"Index":0,"PathSegments":[]}'),
    ("a key twice", b'{"Index":1,"Index":2}'),
    ("Index, then index", b'{"Index":1,"index":2}'),
    ("token, then Token", b'{"PathSegments":[{"token":"a","Token":"b"}]}'),
    ("null fields", b'{"Index":null,"PathSegments":[{"token":null}]}'),
    ("a null segment", b'{"PathSegments":[null]}'),
    ("null", b"null"),
    ("long s (U+017F) for s", '{"Path\u017fegments":[{"token":"a"}]}'.encode()),
    ("Kelvin sign (U+212A) for k", '{"PathSegments":[{"to\u212aen":"a"}]}'.encode()),
    ("a byte that is not UTF-8", b'{"PathSegments":[{"token":"\xff"}]}'),
    ("an escaped lone surrogate", b'{"PathSegments":[{"token":"\\ud800"}]}'),
    ("minus zero", b'{"Index":-0}'),
    ("a negative Index", b'{"Index":-1}'),
    ("Index 2^32", b'{"Index":4294967296}'),
    ("Index 1.0", b'{"Index":1.0}'),
    ("Index as a string", b'{"Index":"1"}'),
    ("PathSegments an object", b'{"PathSegments":{}}'),
    ("a number for a token", b'{"PathSegments":[{"token":1}]}'),
    ("an array", b"[]"),
    ("nothing", b""),
    ("trailing bytes", b'{"Index":0} x'),
    ("NaN", b'{"Index":NaN}'),
    ("a byte order mark", b"\xef\xbb\xbf{}"),
]
# Tokens no NSM peer makes (JWTs are base64url): a different encoding is a DIFF.
ODD_TOKENS = ["<a&b>", "\u2028\u2029", "é日本😀", '"\\/', "\x00\x1f\x7f", "\b\f\n\r\t"]


def registry_nse(name: str) -> NetworkServiceEndpoint:
    return NetworkServiceEndpoint(name=name, url=NSE_URL, network_service_names=[SERVICE])


def token_subject(token: str) -> str:
    """The last part of a token's sub, to name it in a figure."""
    try:
        return str(json.loads(b64decode(token.split(".")[1]))["sub"]).rpartition("/")[2]
    except (IndexError, KeyError, TypeError, ValueError):
        return repr(token[:12])


def shown(text: object) -> str:
    """A path value for a figure: each token shown as <its signer>, and the length."""
    try:
        value = json.loads(str(text))
        for segment in value.get("PathSegments") or []:
            segment["token"] = f"<{token_subject(segment['token'])}>"
        return f"{json.dumps(value, separators=(',', ':'))} ({len(str(text))} bytes)"
    except (AttributeError, KeyError, TypeError, ValueError):
        return repr(text)[:100]


def path_tokens(text: object) -> list[str]:
    """The tokens of a path value (as Go printed it); [] for none or garbage."""
    try:
        return [str(segment["token"]) for segment in json.loads(str(text))["PathSegments"] or []]
    except (KeyError, TypeError, ValueError):
        return []


def our_reading(text: bytes) -> tuple[str, str]:
    """What parse_registry_path makes of a text, and registry_path_json of that."""
    try:
        path = parse_registry_path(text)
    except TokenError:
        return "refused", ""
    try:
        again = registry_path_json(path)
    except ValueError as exc:  # (UnicodeEncodeError is one)
        again = f"<{type(exc).__name__}>"
    return f"index {path.index}, tokens {list(path.tokens)!r}", again


def go_reading(result: dict[str, Any]) -> tuple[str, str]:
    """What Go's json.Unmarshal made of a text (a null segment: None), and json.Marshal of it."""
    if result.get("error"):
        return "refused", ""
    return f"index {result['index']}, tokens {result['tokens']!r}", str(result["again"])


def path_json_checks(report: Report, go: Go, lab: Lab) -> None:
    ours_token = python_token(lab.proxy, lab.go_server).value
    theirs = python_token(lab.go_server, lab.proxy).value
    real = [
        RegistryPath(),
        RegistryPath(0, (ours_token, theirs)),
        RegistryPath(1, (ours_token, theirs)),
        RegistryPath(UINT32_MAX, (ours_token,)),
        RegistryPath(3, ("",)),
    ]
    odd = [RegistryPath(0, (token,)) for token in ODD_TOKENS]
    texts = GO_WRITTEN_PATHS + ODD_PATHS
    seen = go.run(
        "pathjson",
        stdin=json.dumps(
            {
                "decode": [base64.b64encode(text).decode("ascii") for _, text in texts],
                "encode": [{"index": p.index, "tokens": list(p.tokens)} for p in real + odd],
            }
        ),
    )
    encoded = dict(zip(real + odd, seen["encoded"], strict=True))
    wrong = [f"go {encoded[p]!r} ours {registry_path_json(p)!r}" for p in real if
             registry_path_json(p) != encoded[p]]  # fmt: skip
    report.check(
        f"registry_path_json is byte-identical to Go's json.Marshal for {len(real)} paths "
        "(no segments: null; real tokens; index 0, 1 and 2^32-1; an empty token)",
        not wrong,
        "; ".join(wrong) or f"e.g. {shown(encoded[real[1]])}",
    )
    odd_wrong = [f"{p.tokens[0]!r}: go {encoded[p]!r} ours {registry_path_json(p)!r}" for p in odd
                 if registry_path_json(p) != encoded[p]]  # fmt: skip
    if odd_wrong:
        report.diff(f"tokens no NSM peer makes, encoded otherwise than Go ({runtime_version()})",
                    "; ".join(odd_wrong))  # fmt: skip
    else:
        report.check(f"odd tokens ({len(odd)}: HTML, U+2028, controls) encoded as Go does", True)

    readings = dict(zip(texts, seen["decoded"], strict=True))
    wrong = []
    for what, text in GO_WRITTEN_PATHS:
        go_path, our_path = go_reading(readings[what, text])[0], our_reading(text)[0]
        if go_path != our_path:
            wrong.append(f"{what}: go {go_path}; ours {our_path}")
    # (How the path is written again is the business of the encoding checks above.)
    report.check(
        f"parse_registry_path reads {len(GO_WRITTEN_PATHS)} texts as json.Marshal writes them "
        "(escapes included) to the path Go's json.Unmarshal reads",
        not wrong,
        "; ".join(wrong) or ", ".join(what for what, _ in GO_WRITTEN_PATHS),
    )
    same = []
    for what, text in ODD_PATHS:
        theirs_read, ours_read = go_reading(readings[what, text]), our_reading(text)
        if theirs_read == ours_read:
            same.append(what)
        else:
            report.diff(
                f"path text {text!r} ({what}) read otherwise than Go's json.Unmarshal",
                f"go {', then '.join(filter(None, theirs_read))}; "
                f"ours {', then '.join(filter(None, ours_read))}",
            )
    report.check(
        f"path texts no Go peer writes, read (and written again) as Go does: {len(same)} of "
        f"{len(ODD_PATHS)}",
        True,
        ", ".join(same),
    )


async def registry_checks(report: Report, go: Go, lab: Lab, workdir: Path) -> None:
    with report.group("registry `path` metadata: encoding/json on the sdk's Path, both ways"):
        path_json_checks(report, go, lab)
    socket = workdir / "sockets" / "go-registry.sock"
    registry = ("registry", *lab.go_server.tls_args, "-socket", str(socket))
    async with go_server(go, workdir, report, *registry) as lines:
        with report.group("the proxy's RegistryClient -> grpc-go registry (path, mutual TLS)"):
            await client_to_go_registry(report, lab, socket, lines)
    with report.group("grpc-go registry client (as the sdk's) -> the lab registry"):
        await go_client_to_lab_registry(report, go, lab, workdir)


async def client_to_go_registry(report: Report, lab: Lab, socket: Path, lines: Lines) -> None:
    proxy, registry = lab.proxy, lab.go_server
    tls = SpiffeTls(Watched(proxy.identity))
    client = RegistryClient(Signer.of(tls, LIFETIME.total_seconds()))
    nse = registry_nse(ENDPOINT_NAME)
    key: tuple[Literal["endpoint"], str] = ("endpoint", ENDPOINT_NAME)
    async with open_channel(f"unix://{socket}", ssl_context=tls.client()) as channel:
        with trio.fail_after(10):
            answer = await client.register_endpoint(channel, nse)
        first = await lines.next()
        report.check(
            "the first Register sends one `path` value: exactly the empty path's JSON",
            first.get("path_values") == [EMPTY_PATH],
            f"sent {first.get('path_values')}",
        )
        report.check(
            "Go's json.Unmarshal takes it as the empty Path (json.Marshal: the same bytes again)",
            not first.get("path_error") and first.get("received") == EMPTY_PATH,
            first.get("path_error") or f"Go re-encodes {first.get('received')}",
        )
        caller = first.get("token_check", {})
        report.check(
            "golang-jwt verifies the nsm-client-token that became our segment (our TLS leaf)",
            caller.get("ok") is True
            and caller.get("sub") == proxy.id
            and caller.get("aud") == [registry.id],
            caller.get("error")
            or claims_text(caller.get("sub"), caller.get("aud"), caller.get("exp")),
        )
        answered = str(first.get("answered"))
        stored = client.paths.get(key)
        report.check(
            "we store the path Go answered in its `path` header: index 0, [our token, Go's]",
            stored == RegistryPath(0, (str(first.get("token")), str(first.get("own_token")))),
            f"Go answered {shown(answered)}; we hold "
            f"{shown(registry_path_json(stored)) if stored else None}",
        )
        ours = registry_path_json(stored) if stored else None
        report.check(
            "registry_path_json of what we stored is byte-identical to Go's json.Marshal of it",
            ours == answered,
            f"{len(answered)} bytes" if ours == answered else f"go {answered!r}, ours {ours!r}",
        )
        go_token = str(first.get("own_token"))
        try:
            go_claims = verify(go_token, registry.identity.svid.leaf.public_key())
            verdict = claims_text(go_claims.sub, go_claims.aud, go_claims.exp)
            verified = go_claims.sub == registry.id and go_claims.aud == (proxy.id,)
        except TokenError as exc:
            verdict, verified = str(exc), False
        report.check(
            "Go's token in the path (golang-jwt signed) verifies with ours: Go's key, aud us",
            verified,
            verdict,
        )
        report.check(
            "the Register answer (our NSE, echoed by Go) arrives intact",
            answer == nse,
            f"{first.get('request_len')} bytes; peer {first.get('peer_id')}, ALPN "
            f"{first.get('alpn')!r}, {first.get('tls_version')}",
        )

        with trio.fail_after(10):
            await client.register_endpoint(channel, nse)
        second = await lines.next()
        report.check(
            "the refresh sends back the path Go answered, byte for byte",
            second.get("path_values") == [answered],
            f"sent {[shown(value) for value in second.get('path_values') or []]}",
        )
        received = second.get("received")
        report.check(
            "Go decodes it to the tokens it answered; its json.Marshal of them is our bytes",
            not second.get("path_error")
            and received == answered
            and stored is not None
            and json.loads(str(received))
            == {"Index": 0, "PathSegments": [{"token": token} for token in stored.tokens]},
            second.get("path_error") or f"Go re-encodes {shown(received)}",
        )
        renewed = client.paths.get(key)
        report.check(
            "Go replaced both tokens (the sdk's refresh); we store the new path, index 0",
            renewed is not None
            and stored is not None
            and renewed == RegistryPath(0, (str(second.get("token")), str(second.get("own_token"))))
            and set(renewed.tokens).isdisjoint(stored.tokens)
            and registry_path_json(renewed) == second.get("answered"),
            f"we hold {renewed and shown(registry_path_json(renewed))}",
        )

        with trio.fail_after(10):
            await client.unregister_endpoint(channel, nse)
        third = await lines.next()
        report.check(
            "Unregister sends the refreshed path, takes Go's empty answer, forgets the path",
            third.get("method") == NSE_REGISTRY + "Unregister"
            and third.get("path_values") == [second.get("answered")]
            and third.get("reply_len") == 0
            and key not in client.paths,
            f"sent {[shown(value) for value in third.get('path_values') or []]}; answer "
            f"{third.get('reply_len')} bytes; {'still held' if key in client.paths else 'dropped'}",
        )

        client.paths[key] = RegistryPath(index=2, tokens=("a", "b"))
        try:
            with trio.fail_after(10):
                await client.register_endpoint(channel, nse)
            code, message = None, "accepted!"
        except RpcFailedError as exc:
            code, message = exc.status.status_code, str(exc.status.status_message)
        fourth = await lines.next()
        report.check(
            "a path pointing past its segments: Go's UNKNOWN (the sdk's words) reaches us, "
            "and we drop the path",
            code == StatusCode.UNKNOWN
            and message == fourth.get("error")
            and fourth.get("path_values") == [registry_path_json(RegistryPath(2, ("a", "b")))]
            and key not in client.paths,
            f"{code}: {message!r}",
        )


def call_figures(result: dict[str, Any]) -> str:
    text = f"{result.get('method', '').rpartition('/')[2]} code {result.get('code')}"
    if result.get("message"):
        text += f" {result['message']!r}"
    return text + f"; call {result.get('call_ms')} ms"


async def go_client_to_lab_registry(report: Report, go: Go, lab: Lab, workdir: Path) -> None:
    go_nsc, nsmgr = lab.go_client, lab.nsmgr
    socket = workdir / "sockets" / "lab-nsm.sock"
    scratch = workdir / "scratch" / "lab-registry"
    scratch.mkdir(mode=0o700)
    nse_file = scratch / "nse.bin"
    nse_file.write_bytes(registry_nse("go-nse-a").SerializeToString())
    tls = SpiffeTls(Watched(nsmgr.identity))
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_nsm, str(socket), forwarder=NoKernel(), tls=tls))
        try:
            args = [str(go.binary), "register", *go_nsc.tls_args, "-socket", str(socket)]
            with trio.fail_after(30):
                done = await trio.run_process(
                    [*args, "-in", str(nse_file)],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            if done.returncode != 0:
                raise RuntimeError(f"nsminterop register failed: {done.stderr.decode().strip()}")
            calls = [json.loads(line) for line in done.stdout.decode().splitlines()]
            go_registrations(report, lab, calls)
            await lab_registry_leniency(report, GoClient(go, scratch, socket), lab)
        finally:
            nursery.cancel_scope.cancel()


def go_registrations(report: Report, lab: Lab, calls: list[dict[str, Any]]) -> None:
    go_nsc, nsmgr = lab.go_client, lab.nsmgr
    first, refresh, unregister = calls
    report.check(
        "Register from grpc-go (per-RPC tokens, the sdk's path client) passes our registry",
        first.get("code") == "OK",
        call_figures(first) + f"; peer {first.get('peer_id')}, ALPN {first.get('alpn')!r}",
    )
    report.check(
        "the path Go sends first (json.Marshal of an empty Path) is the one we send first",
        first.get("sent_path") == EMPTY_PATH == registry_path_json(RegistryPath()),
        str(first.get("sent_path")),
    )
    header, held = first.get("header_path") or [], first.get("held")
    report.check(
        "we answer one `path` header; Go's json.Unmarshal takes it into the sdk's Path and "
        "json.Marshal gives our bytes back",
        len(header) == 1 and not first.get("path_error") and held == header[0],
        first.get("path_error") or f"{len(header)} value(s): {shown(header[0] if header else '')}",
    )
    tokens = path_tokens(held)
    report.check(
        "the path Go holds: index 0, [the token Go sent, ours]",
        json.loads(str(held)).get("Index") == 0
        and len(tokens) == 2
        and tokens[0] == first.get("sent_token"),
        shown(held),
    )
    checks = first.get("token_checks") or []
    ours = checks[1] if len(checks) == 2 else {}
    report.check(
        "golang-jwt verifies both: Go's own, and ours against our TLS leaf (sub us, aud Go)",
        all(check.get("ok") for check in checks)
        and len(checks) == 2
        and ours.get("sub") == nsmgr.id
        and ours.get("aud") == [go_nsc.id],
        "; ".join(
            check.get("error") or claims_text(check.get("sub"), check.get("aud"), check.get("exp"))
            for check in checks
        ),
    )
    report.check(
        "the refresh passes, sending the held path back byte for byte (Go re-encoded it)",
        refresh.get("code") == "OK" and refresh.get("sent_path") == held,
        call_figures(refresh) + f"; sent {shown(refresh.get('sent_path'))}",
    )
    again = path_tokens(refresh.get("held"))
    report.check(
        "we replaced both tokens; golang-jwt verifies the new ones; index 0 again",
        json.loads(str(refresh.get("held"))).get("Index") == 0
        and len(again) == 2
        and again[0] == refresh.get("sent_token")
        and not set(again) & set(tokens)
        and all(check.get("ok") for check in refresh.get("token_checks") or [{}]),
        shown(refresh.get("held")),
    )
    report.check(
        "Unregister passes with the held path and gets an empty message back",
        unregister.get("code") == "OK"
        and unregister.get("sent_path") == refresh.get("held")
        and unregister.get("reply_len") == 0,
        call_figures(unregister) + f"; path answered {len(unregister.get('header_path') or [])}x",
    )


async def lab_registry_leniency(report: Report, client: GoClient, lab: Lab) -> None:
    """Where the metadata is missing or repeated: no sdk client does that, so a difference from
    the sdk's grpcmetadata server is a DIFF."""
    register = NSE_REGISTRY + "Register"
    bare = await client.call(lab.go_client, register, registry_nse("go-nse-b"), None, "-sign")
    answered = bare.result.get("header_path") or []
    if bare.code != "OK":
        report.check(
            "a Register without path metadata passes (the sdk warns)", False, bare.figures()
        )
    elif answered:
        report.diff(
            "a Register without path metadata: we answer a `path` header, the sdk's grpcmetadata "
            "server (which skips itself) answers none",
            f"answered {shown(answered[0])}",
        )
    else:
        report.check("a Register without path metadata passes, no path answered (as the sdk)", True)

    past = registry_path_json(RegistryPath(7, ("x",)))
    twice = await client.call(
        lab.go_client,
        register,
        registry_nse("go-nse-c"),
        [(PATH_KEY, EMPTY_PATH), (PATH_KEY, past)],
        "-sign",
    )
    if twice.code == "Unknown":
        report.check(
            "two `path` values: the last counts, as in the sdk's fromMD", True, twice.figures()
        )
    elif twice.code == "OK":
        report.diff(
            "two `path` values (the empty path, then one past its segments): we read the first, "
            "the sdk's fromMD the last (and would answer UNKNOWN)",
            twice.figures(),
        )
    else:
        report.check("two `path` values: one of them is read", False, twice.figures())


# --- main ----------------------------------------------------------------------------------------


async def rpc_checks(report: Report, go: Go, lab: Lab, workdir: Path) -> None:
    (workdir / "sockets").mkdir(mode=0o700)
    (workdir / "scratch").mkdir(mode=0o700)
    await endpoint_checks(report, go, lab, workdir)
    await server_checks(report, go, lab, workdir)
    await registry_checks(report, go, lab, workdir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show the proxy's log lines")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)
    logger.remove()
    if options.verbose:
        logger.add(sys.stderr, level="DEBUG")

    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="nsminterop-"))
    try:
        try:
            binary, seconds = build(workdir)
        except Missing as exc:
            print(f"SKIP  Go interop: {exc}")
            return 2
        print(f"built {binary.name} in {seconds:.1f} s; {versions()}")
        go = Go(binary)
        lab = make_lab(workdir)
        token_checks(report, go, lab)
        trio.run(rpc_checks, report, go, lab, workdir)
    finally:
        if options.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{report.passed} passed, {len(report.failed)} failed, {len(report.diffs)} DIFF")
    for name in report.failed:
        print(f"  FAIL {name}")
    for text in report.diffs:
        print(f"  DIFF {text}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
