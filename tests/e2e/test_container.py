"""The image, run the way Kubernetes runs it, against the lab peers.

`make image` builds it (podman; a cached build takes seconds). Then the recipe of
tests/integration/test_proxy_lab.py, with the proxy as that image's container instead of a process:

  lab ipam, lab nsp, lab nsm        host processes on UNIX sockets in a scratch directory
  sysctl-init                       the image's `entrypoint sysctl-init`, privileged, in the
                                    proxy's namespace (the DaemonSet's init container)
  proxy                             the image, `--network ns:/run/netns/<proxy ns>`, as the pod:
                                    non-root, read-only root, capabilities: NET_ADMIN and NET_RAW
                                    only, /tmp an empty directory, the NSM socket directory
                                    mounted read-only at /var/lib/networkservicemesh, and the
                                    environment of container/kubernetes/ (lab addresses aside)
  lb0, lb1, tg0                     `lab lb` and `lab target`, each in its own namespace

What stands in for the cluster, and why:

* Kubernetes gives a non-root container no ambient capabilities, podman does: the container
  starts under `setpriv --inh-caps=-all --ambient-caps=-all`, so the proxy holds NET_ADMIN and
  NET_RAW only through the image's file capabilities, as in a pod (checked in /proc/1/status).
* NSM reaches the proxy's endpoint socket in the pod's /tmp by the file descriptor the proxy
  passes when it registers; so does the lab NSM (`--map-path /tmp=<the directory that is the
  container's /tmp>` is only its fallback for a registration by path).
* The lab peers' sockets are made connectable by the proxy's UID, as NSM's socket is for
  upstream's proxy (the same non-root UID, without DAC_OVERRIDE).

Probed the way the kubelet does: the exec probes' commands from the manifest in the container
(`podman exec`), and the gRPC probes from outside it. Checked in the kernel of the proxy's
namespace; a crash and restart in the same "pod" (same namespace, same /tmp) must adopt the
kernel state without losing a ping; stopped like a pod (`podman stop --time 25`: SIGTERM, then
SIGKILL after the grace period), it must exit 0 within NSM_SHUTDOWN_TIMEOUT. Where podman cannot
build or run the image, the test fails and says why: it never skips.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import proxy
from proxy import config
from tests.integration.netns import ip, ip_json
from tests.integration.test_proxy_lab import (
    LB_SERVICE,
    NAMESPACE,
    NODE,
    PROXY_SERVICE,
    TRENCH,
    VIPS,
    group_members,
    node_address,
    nsp_config,
    ping_twice,
    vip_rule_sources,
)
from tests.integration.waiting import wait_until
from tests.unit import test_manifests as manifests

pytestmark = [pytest.mark.root, pytest.mark.container, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = f"localhost/meridio-proxy:{proxy.__version__}"
CONTAINERS_CONF = ROOT / "container" / "containers.conf"
GRACE: int = manifests.daemonset(manifests.MANIFESTS[0])["spec"]["template"]["spec"][
    "terminationGracePeriodSeconds"
]
SHUTDOWN_TIMEOUT = config.Config(host="-").shutdown_timeout  # the default, 20 s
UID = manifests.UID
NET_ADMIN, NET_RAW = 1 << 12, 1 << 13
# Kubernetes' container: no ambient (or inheritable) capabilities for a non-root user.
AS_IN_A_POD = ["--entrypoint", "setpriv", IMAGE, "--inh-caps=-all", "--ambient-caps=-all", "--",
               "/usr/local/bin/entrypoint"]  # fmt: skip


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built by `make image` (the base is made once and kept: later builds are fast)."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.fail(
            "podman and runc are needed to build and run the image (Debian: apt-get install "
            "podman runc debootstrap; `make test` installs them as root)"
        )
    started = time.monotonic()
    build = subprocess.run(
        ["make", "-s", "image", f"IMAGE={IMAGE}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if build.returncode != 0:
        pytest.fail(
            f"`make image` failed ({build.returncode}):\n{(build.stdout + build.stderr)[-4000:]}"
        )
    print(f"make image: {time.monotonic() - started:.1f}s")
    return IMAGE


def test_the_entrypoint_names_what_the_pod_must_grant(image: str) -> None:
    """Capabilities missing or turned off: exit 1 before the proxy starts, saying what to add."""
    run = ["run", "--rm", "--network", "none", "--cap-drop", "ALL"]
    no_raw = podman(*run, "--cap-add", "NET_ADMIN", *AS_IN_A_POD, check=False)
    assert no_raw.returncode == 1, no_raw.stderr
    assert "missing capability NET_RAW" in no_raw.stderr
    assert "capabilities.add: [NET_RAW]" in no_raw.stderr
    assert "missing capability NET_ADMIN" not in no_raw.stderr

    no_new_privs = podman(
        *run, "--cap-add", "NET_ADMIN,NET_RAW", "--security-opt", "no-new-privileges",
        *AS_IN_A_POD, check=False,
    )  # fmt: skip
    assert no_new_privs.returncode == 1, no_new_privs.stderr
    assert "allowPrivilegeEscalation: false" in no_new_privs.stderr

    # probe, debug, --help and --version need no capabilities at all.
    version = podman("run", "--rm", "--network", "none", "--cap-drop", "ALL", image, "--version")
    assert version.stdout.strip() == f"meridio-proxy {proxy.__version__}"


# -- the lab around the container ----------------------------------------------------------------


@attrs.define
class Lab:
    directory: Path  # not under /tmp: the lab NSM sees the pod's /tmp there
    namespaces: dict[str, str]
    container: str
    processes: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)

    @property
    def pod_tmp(self) -> Path:  # the container's /tmp (the pod's emptyDir)
        return self.directory / "pod-tmp"

    @property
    def nsm_dir(self) -> Path:  # the node's /var/lib/networkservicemesh
        return self.directory / "nsm"

    @property
    def peers_dir(self) -> Path:  # IPAM's and NSP's sockets (Kubernetes services in a cluster)
        return self.directory / "peers"

    def socket(self, name: str) -> str:
        return f"unix://{self.directory}/{name}.sock"

    def start(self, name: str, args: list[str], netns: str | None = None) -> None:
        inside = ["ip", "netns", "exec", netns] if netns else []
        with open(self.directory / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [*inside, sys.executable, "-m", "proxy", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ["PATH"]},
            )

    def stop(self, name: str, timeout: float = 15) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def proxy_log(self) -> str:
        return podman("logs", self.container, check=False).stdout[-6000:]

    def diagnostics(self) -> str:  # for `wait_until`
        return f"--- proxy ---\n{self.proxy_log()}"


def wait_for_socket(path: Path, lab: Lab) -> None:
    wait_until(path.exists, 20, f"{path.name} up", lab)
    path.chmod(0o666)  # the proxy's UID connects (NSM's socket allows upstream's proxy too)


@pytest.fixture
def lab(image: str) -> Iterator[Lab]:
    directory = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="mp-ctr-"))
    token = secrets.token_hex(3)
    names = {role: f"mp-{role}-{token}" for role in ("proxy", "lb0", "lb1", "tg0")}
    running = Lab(directory, names, container=f"mp-proxy-{token}")
    try:
        for path in (running.pod_tmp, running.nsm_dir, running.peers_dir):
            path.mkdir()
        running.pod_tmp.chmod(0o1777)  # an emptyDir
        for name in names.values():
            ip("netns", "add", name)
            ip("link", "set", "lo", "up", netns=name)
        (directory / "nsp.json").write_text(json.dumps(nsp_config()))
        ipam_socket, nsp_socket = running.peers_dir / "ipam.sock", running.peers_dir / "nsp.sock"
        nsm_socket = running.nsm_dir / "nsm.io.sock"
        running.start(
            "ipam",
            ["lab", "ipam", "--listen", f"unix://{ipam_socket}", "--db", str(directory / "ipam.db"),
             "--prefix", "198.18.0.0/16", "--prefix", "2001:db8:100::/48", "--trench", TRENCH],
        )  # fmt: skip
        nsp_file = str(directory / "nsp.json")
        running.start(
            "nsp", ["lab", "nsp", "--listen", f"unix://{nsp_socket}", "--config", nsp_file]
        )
        # NSM dials the endpoint path the proxy registers, which is in the container's /tmp
        # (the pod's emptyDir, here a host directory): the lab maps it (NSM passes an fd).
        running.start(
            "nsm",
            ["lab", "nsm", "--listen", f"unix://{nsm_socket}",
             "--map-path", f"/tmp={running.pod_tmp}"],
        )  # fmt: skip
        for path in (ipam_socket, nsp_socket, nsm_socket):
            wait_for_socket(path, running)
        for lb in ("lb0", "lb1"):
            running.start(
                lb,
                ["lab", "lb", "--nsm", f"unix://{nsm_socket}", "--listen", running.socket(lb),
                 "--name", lb, "--service", LB_SERVICE, "--netns", names[lb]],
            )  # fmt: skip
        yield running
    finally:
        podman("rm", "--force", "--time", "0", running.container, check=False)
        for name in list(running.processes):
            running.stop(name)
        for name in names.values():
            ip("netns", "del", name, check=False)
        shutil.rmtree(directory, ignore_errors=True)


# The pod these stand for: the manifests' environment is what the container gets.
POD = {
    "metadata.name": "proxy-a",
    "metadata.namespace": NAMESPACE,
    "spec.nodeName": NODE,
    "status.podIP": "127.0.0.1",  # the gRPC probe's address: the proxy's namespace has no other
}
# Where the lab differs from a cluster: IPAM and NSP are sockets, not services; shorter timers.
LAB_ENV = {
    "NSM_IPAM_SERVICE": "unix:///run/lab/ipam.sock",
    "NSM_NSP_SERVICE": "unix:///run/lab/nsp.sock",
    "NSM_REQUEST_TIMEOUT": "5s",
    "NSM_IP_RELEASE_DELAY": "1s",
    "NSM_MAX_TOKEN_LIFETIME": "1m",
    "NSM_IDENTITY": "insecure",  # the lab's peers speak plain text here
}


def manifest(variant: str) -> dict[str, Any]:
    """The proxy container of container/kubernetes/proxy-<variant>-probes.yaml."""
    [path] = [p for p in manifests.MANIFESTS if p.name == f"proxy-{variant}-probes.yaml"]
    return manifests.container(manifests.daemonset(path), "proxy")


def proxy_container_args(lab: Lab) -> list[str]:
    """`podman run` as the DaemonSet runs the proxy (the gRPC variant: its environment is the
    exec variant's plus the TCP health server)."""
    env = {**manifests.resolved_env(manifest("grpc"), POD), **LAB_ENV}
    assert env["NSM_SERVICE_NAME"] == PROXY_SERVICE
    assert env["NSM_NETWORK_SERVICE_NAME"] == LB_SERVICE
    return [
        "run", "--detach", "--name", lab.container,
        "--network", f"ns:/run/netns/{lab.namespaces['proxy']}",
        "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
        "--read-only",
        "--volume", f"{lab.pod_tmp}:/tmp",
        "--volume", f"{lab.nsm_dir}:/var/lib/networkservicemesh:ro",
        "--volume", f"{lab.peers_dir}:/run/lab:ro",
        *[a for name, value in env.items() for a in ("--env", f"{name}={value}")],
        *AS_IN_A_POD,
    ]  # fmt: skip


def kubelet_probe(lab: Lab, probe: str) -> int:
    """The exec variant's probe (startupProbe, readinessProbe, livenessProbe), as the kubelet
    runs it: its command, inside the container."""
    command = manifest("exec")[probe]["exec"]["command"]
    return podman("exec", lab.container, *command, check=False, timeout=20).returncode


def grpc_probe(lab: Lab, probe: str) -> int:
    """The gRPC variant's probe: a Check on the pod's address, from outside the container."""
    port, service = (manifest("grpc")[probe]["grpc"].get(k, "") for k in ("port", "service"))
    return subprocess.run(
        ["ip", "netns", "exec", lab.namespaces["proxy"], sys.executable, "-m", "proxy", "probe",
         "-addr", f"{POD['status.podIP']}:{port}", "-service", service],
        capture_output=True,
        timeout=20,
    ).returncode  # fmt: skip


def subservice(lab: Lab, name: str) -> int:
    """What the operator asks when Readiness is not SERVING (docs/operations.md)."""
    return podman(
        "exec", lab.container, "meridio-proxy", "probe", "-addr", "unix:///tmp/health.sock",
        "-service", name, check=False, timeout=20,
    ).returncode  # fmt: skip


def bridge_ports(netns: str) -> list[str]:
    return [
        x["ifname"] for x in ip_json("link", "show", netns=netns) if x.get("master") == "bridge0"
    ]


def addresses(netns: str, ifname: str) -> list[str]:
    [link] = ip_json("addr", "show", ifname, netns=netns)
    return sorted(a["local"] for a in link["addr_info"] if a.get("scope") == "global")


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_the_proxy_container_serves_the_lab_and_stops_on_sigterm(lab: Lab) -> None:
    proxy_ns = lab.namespaces["proxy"]

    # The init container: the sysctls, set in the proxy's namespace by the image itself.
    init = podman(
        "run", "--rm", "--privileged", "--user", "0", "--network", f"ns:/run/netns/{proxy_ns}",
        IMAGE, "sysctl-init",
    )  # fmt: skip
    assert "cannot set" not in init.stderr, init.stderr
    forwarding = ip("netns", "exec", proxy_ns, "cat", "/proc/sys/net/ipv4/conf/all/forwarding")
    assert forwarding.strip() == "1"

    started = time.monotonic()
    podman(*proxy_container_args(lab))
    wait_until(lambda: kubelet_probe(lab, "startupProbe") == 0, 30, "the startup probe", lab)
    up = time.monotonic() - started
    wait_until(lambda: kubelet_probe(lab, "readinessProbe") == 0, 90, "Readiness SERVING", lab)
    ready = time.monotonic() - started
    print(f"container start to health served: {up:.1f}s, to Readiness SERVING: {ready:.1f}s")
    assert kubelet_probe(lab, "livenessProbe") == 0
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert grpc_probe(lab, probe) == 0, probe
    for name in ("IPAMCli", "NSPCli", "NSMEndpoint", "Egress"):
        assert subservice(lab, name) == 0, name

    # The pod's proxy: PID 1, non-root, NET_ADMIN and NET_RAW from the file capabilities only.
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", lab.container).stdout)
    status = status_of(pid)
    assert status["Uid"].split()[0] == str(UID)
    effective, ambient = int(status["CapEff"], 16), int(status["CapAmb"], 16)
    assert effective == NET_ADMIN | NET_RAW, status["CapEff"]
    assert ambient == 0, status["CapAmb"]
    logs = podman("logs", lab.container)
    assert "warning: sysctl" not in logs.stdout + logs.stderr  # the init container set them

    # The kernel of the proxy's namespace: bridge, both LBs as ports and nexthops, VIP rules.
    wait_until(
        lambda: all(len(v) == 2 for v in group_members(proxy_ns).values()),
        30,
        "egress over both LBs",
        lab,
    )
    lab.start(
        "tg0",
        ["lab", "target", "--nsm", f"unix://{lab.nsm_dir}/nsm.io.sock", "--name", "tg0",
         "--node", NODE, "--service", PROXY_SERVICE, "--interface", "eth0",
         *[a for v in VIPS for a in ("--vip", v)], "--netns", lab.namespaces["tg0"]],
    )  # fmt: skip
    wait_until(lambda: len(bridge_ports(proxy_ns)) == 3, 30, "the target's port on the bridge", lab)
    assert vip_rule_sources(proxy_ns) == sorted(v.split("/")[0] for v in VIPS)
    lb_address = node_address(lab.namespaces["lb0"])
    ping = ping_twice(lab.namespaces["tg0"], lb_address)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert kubelet_probe(lab, "readinessProbe") == 0

    # Resources, for the DaemonSet's requests and limits.
    cpu_before, sampled = cpu_seconds(pid), time.monotonic()
    time.sleep(5)
    idle_cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - sampled)
    status = status_of(pid)
    print(
        f"proxy: VmRSS {status['VmRSS']}, VmHWM {status['VmHWM']}, threads {status['Threads']}, "
        f"CPU since start {cpu_seconds(pid):.2f}s, CPU idle {idle_cpu * 1000:.1f} millicores"
    )

    # A crash, and the kubelet starts the container again in the same pod: same namespace, same
    # /tmp (an emptyDir outlives its containers; the old health socket is still there). The new
    # instance adopts the kernel state: same bridge and MAC, no port twice, the target keeps its
    # addresses and its traffic.
    [bridge] = ip_json("link", "show", "bridge0", netns=proxy_ns)
    target_addresses = addresses(lab.namespaces["tg0"], "eth0")
    pinging = subprocess.Popen(  # 20 a second through the bridge, all along
        ["ip", "netns", "exec", lab.namespaces["tg0"], "ping", "-n", "-q", "-i", "0.05", "-W", "1",
         lb_address],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(1)
        podman("kill", "--signal", "KILL", lab.container)
        podman("wait", lab.container)
        assert (lab.pod_tmp / "health.sock").exists()
        restarted = time.monotonic()
        podman("start", lab.container)
        wait_until(
            lambda: kubelet_probe(lab, "readinessProbe") == 0, 60, "Readiness after restart", lab
        )
        print(f"container restart to Readiness SERVING: {time.monotonic() - restarted:.1f}s")
        time.sleep(1)
    finally:
        pinging.send_signal(signal.SIGINT)
        summary = pinging.communicate(timeout=10)[0]
    sent, received = (
        int(n) for n in re.findall(r"(\d+) packets transmitted, (\d+) received", summary)[0]
    )
    print(f"ping through the crash and restart: {received}/{sent} answered")
    assert sent > 20 and received == sent, summary
    [bridge_after] = ip_json("link", "show", "bridge0", netns=proxy_ns)
    assert (bridge_after["ifindex"], bridge_after["address"]) == (
        bridge["ifindex"],
        bridge["address"],
    )
    assert len(bridge_ports(proxy_ns)) == 3
    assert addresses(lab.namespaces["tg0"], "eth0") == target_addresses
    ping = subprocess.run(
        ["ip", "netns", "exec", lab.namespaces["tg0"], "ping", "-c", "1", "-W", "2", lb_address],
        capture_output=True,
        text=True,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", lab.container).stdout)
    assert int(status_of(pid)["CapEff"], 16) == NET_ADMIN | NET_RAW

    # Stopped like a pod: SIGTERM, the grace period, then SIGKILL. It must not need the SIGKILL.
    stopping = time.monotonic()
    podman("stop", "--time", str(GRACE), lab.container, timeout=GRACE + 30)
    took = time.monotonic() - stopping
    print(f"SIGTERM to exit: {took:.2f}s")
    state = json.loads(podman("inspect", "--format", "{{json .State}}", lab.container).stdout)
    assert state["ExitCode"] == 0, (state, lab.proxy_log())
    assert took < SHUTDOWN_TIMEOUT, lab.proxy_log()
    assert not (lab.pod_tmp / "health.sock").exists()
    assert '"message": "stopped"' in lab.proxy_log()
