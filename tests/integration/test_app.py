"""The real `meridio-proxy` process: health over the socket, probes, signals, exit status.

Each test starts the program as a container would (NSM_* environment), talks to it the way
kubelet and a person would (`meridio-proxy probe`, grpcio's health client), and stops it by its
exact pid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

# The proxy manages the kernel of its network namespace (a pod's, in Kubernetes): every proxy
# here runs in a throw-away namespace of its own.
pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

# grpcio-health-checking's own client, in a process of its own: its health_pb2 and ours define
# the same proto symbols and cannot share a descriptor pool.
GRPCIO_CHECK = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=sys.argv[2]), timeout=5)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError as exc:
        print(exc.code().name)
"""


@attrs.define
class RunningProxy:
    process: subprocess.Popen[str]
    directory: Path
    socket_path: Path
    log_path: Path
    netns: str

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{text!r} never logged:\n{self.log()}")
            time.sleep(0.05)


def start_proxy(directory: Path, **env: str) -> RunningProxy:
    socket_path = directory / "health.sock"
    log_path = directory / f"proxy-{secrets.token_hex(2)}.log"
    netns = f"mp-app-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    environment = {
        "PATH": os.environ["PATH"],
        "NSM_HOST": "node-a",
        "NSM_IDENTITY": "insecure",
        "NSM_HEALTH_ADDRESS": f"unix://{socket_path}",
        "NSM_STATE_DIR": str(directory),
        "NSM_LOG_FORMAT": "json",
        **env,
    }
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "proxy"],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return RunningProxy(process, directory, socket_path, log_path, netns)


def stop(proxy: RunningProxy) -> None:
    if proxy.process.poll() is None:
        proxy.process.kill()
    proxy.process.wait(timeout=10)
    subprocess.run(["ip", "netns", "del", proxy.netns], check=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: AF_UNIX socket paths are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="mp-app-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def proxy(workdir: Path) -> Iterator[RunningProxy]:
    running = start_proxy(workdir)
    try:
        running.wait_for_log('"message": "started"')
        yield running
    finally:
        stop(running)


def probe(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    inside = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*inside, sys.executable, "-m", "proxy", "probe", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )


def log_records(proxy: RunningProxy) -> list[dict[str, object]]:
    return [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]


def test_probe_answers_like_kubelet_expects(proxy: RunningProxy) -> None:
    startup = probe("-addr", proxy.address)
    assert (startup.returncode, startup.stdout.strip()) == (0, "status: SERVING")
    readiness = probe(f"-addr={proxy.address}", "-service", "Readiness")
    assert readiness.returncode == 1
    assert "NOT_SERVING" in readiness.stderr
    liveness = probe("--addr", proxy.address, "--service", "Liveness", "-rpc-timeout", "400ms")
    assert liveness.returncode == 1
    unknown = probe("-addr", proxy.address, "-service", "Startup")
    assert unknown.returncode == 1
    assert "unknown" in unknown.stderr


def test_probe_exit_status_for_usage_and_connection_errors(workdir: Path) -> None:
    bad_flag = probe("-addr", "unix:///x.sock", "-nonsense")
    assert bad_flag.returncode == 2
    assert "usage" in bad_flag.stderr
    bad_address = probe("-addr", "nonsense")
    assert bad_address.returncode == 2
    assert "-addr 'nonsense'" in bad_address.stderr
    nobody = probe("-addr", f"unix://{workdir}/nobody.sock")
    assert nobody.returncode == 3
    assert "cannot connect" in nobody.stderr


def test_grpcio_health_client_gets_the_same_answers(proxy: RunningProxy) -> None:
    def check(service: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", GRPCIO_CHECK, proxy.address, service],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert check("") == "SERVING"
    assert check("Readiness") == "NOT_SERVING"
    assert check("Liveness") == "NOT_SERVING"
    assert check("Startup") == "NOT_FOUND"


def test_sigterm_stops_quickly_with_status_0_and_removes_the_socket(proxy: RunningProxy) -> None:
    assert proxy.socket_path.exists()
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=10) == 0
    elapsed = time.monotonic() - started
    print(f"SIGTERM to exit: {elapsed * 1000:.0f} ms")
    assert elapsed < 5
    assert not proxy.socket_path.exists()
    messages = [record["message"] for record in log_records(proxy)]
    assert "stopping" in messages
    assert messages[-1] == "stopped"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGQUIT])
def test_other_stop_signals_also_stop_cleanly(
    proxy: RunningProxy, stop_signal: signal.Signals
) -> None:
    proxy.process.send_signal(stop_signal)
    assert proxy.process.wait(timeout=10) == 0
    assert not proxy.socket_path.exists()


def test_sigusr1_and_sigusr2_change_the_level_and_never_kill(proxy: RunningProxy) -> None:
    proxy.process.send_signal(signal.SIGUSR2)
    proxy.wait_for_log('"to": "TRACE"')
    proxy.process.send_signal(signal.SIGUSR1)
    proxy.wait_for_log('"to": "DEBUG"')  # back to the configured NSM_LOG_LEVEL (DEBUG)
    assert proxy.process.poll() is None
    assert probe("-addr", proxy.address).returncode == 0


def test_sighup_rereads_the_config_file(workdir: Path) -> None:
    config_file = workdir / "proxy.env"
    config_file.write_text("NSM_LOG_LEVEL=INFO\n")
    running = start_proxy(workdir, NSM_CONFIG_FILE=str(config_file))
    try:
        running.wait_for_log('"message": "started"')
        config_file.write_text("NSM_LOG_LEVEL=TRACE\nNSM_TRENCH=other\n")
        running.process.send_signal(signal.SIGHUP)
        running.wait_for_log("configuration reloaded")
        records = {str(r["message"]): r for r in log_records(running)}
        assert records["log level changed"]["extra_data"] == {"from": "INFO", "to": "TRACE"}
        restart = records["changes need a restart to take effect"]["extra_data"]
        assert restart == {"variables": "NSM_TRENCH"}
        # A broken file is reported and the running configuration kept.
        config_file.write_text("NSM_LOG_LEVEL=LOUD\n")
        running.process.send_signal(signal.SIGHUP)
        running.wait_for_log("reload rejected")
        assert running.process.poll() is None
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=10) == 0
    finally:
        stop(running)


def test_health_on_tcp_for_kubernetes_grpc_probes(workdir: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    running = start_proxy(workdir, NSM_HEALTH_TCP_ADDRESS=f"127.0.0.1:{port}")
    try:
        running.wait_for_log('"message": "started"')
        # The port is in the proxy's namespace, as a pod IP's is: kubelet connects there.
        tcp = f"127.0.0.1:{port}"
        assert probe("-addr", tcp, netns=running.netns).returncode == 0
        assert probe("-addr", tcp, "-service", "Readiness", netns=running.netns).returncode == 1
    finally:
        stop(running)


def test_a_live_server_on_the_health_socket_is_not_stolen(proxy: RunningProxy) -> None:
    second = start_proxy(proxy.directory)
    try:
        assert second.process.wait(timeout=10) == 1
        assert "another server is listening" in second.log()
    finally:
        stop(second)
    assert probe("-addr", proxy.address).returncode == 0, "the first proxy must keep serving"


def test_a_stale_socket_file_is_replaced(workdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(workdir / "health.sock"))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed proxy leaves
    running = start_proxy(workdir)
    try:
        running.wait_for_log('"message": "started"')
        assert probe("-addr", running.address).returncode == 0
    finally:
        stop(running)


def test_without_a_workload_api_it_waits_for_an_identity_and_still_stops_cleanly(
    workdir: Path,
) -> None:
    """NSM_IDENTITY=spiffe (the default) with no SPIRE agent: the proxy says what it waits for,
    reports Readiness NOT_SERVING (it has no peer yet), and a SIGTERM still stops it with 0."""
    agent = workdir / "agent.sock"
    proxy = start_proxy(workdir, NSM_IDENTITY="spiffe", SPIFFE_ENDPOINT_SOCKET=f"unix://{agent}")
    try:
        proxy.wait_for_log('"message": "Workload API unavailable"')
        readiness = probe("-addr", f"unix://{proxy.socket_path}", "-service", "Readiness")
        assert readiness.returncode == 1
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=10) == 0
    finally:
        stop(proxy)
    [waiting] = [r for r in log_records(proxy) if r["message"] == "Workload API unavailable"]
    assert str(agent) in json.dumps(waiting)


def test_with_identity_files_it_starts_with_mutual_tls(workdir: Path) -> None:
    """NSM_IDENTITY=files: the SVID is read, named in the log, and the proxy goes on (to its
    peers, which are absent here)."""
    from proxy.lab.spiffe_ca import LabCa

    cert, key, bundle = LabCa.create("lab.example").write_files(workdir, "/proxy")
    proxy = start_proxy(
        workdir,
        NSM_IDENTITY="files",
        NSM_TLS_CERT_FILE=str(cert),
        NSM_TLS_KEY_FILE=str(key),
        NSM_TLS_BUNDLE_FILE=str(bundle),
    )
    try:
        proxy.wait_for_log('"message": "mutual TLS"')
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=10) == 0
    finally:
        stop(proxy)
    records = {r["message"]: r for r in log_records(proxy)}
    assert "spiffe://lab.example/proxy" in json.dumps(records["identity"])
    assert "spiffe://lab.example (any ID)" in json.dumps(records["mutual TLS"])


def test_insecure_is_said_loudly(proxy: RunningProxy) -> None:
    proxy.wait_for_log("PLAIN TEXT")  # (said after "started", when the identity is chosen)
    [warning] = [r for r in log_records(proxy) if str(r["message"]).startswith("PLAIN TEXT")]
    assert warning["severity"] == "warning"
