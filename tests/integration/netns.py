"""Several hosts on one machine: each service in its own network namespace, with its own address on a
bridge, started from docker/compose.cpu.yaml's own entrypoints and commands the way its containers run
them (docker/launch.py adds --advertise with the namespace's address; names resolve as on the compose
network). A host's link can be cut and restored (`ip link set ... down/up`): its packets then go nowhere
and its connections hang, as when a machine drops off the network.

Needs root and `ip` (iproute2); `unavailable()` says why not, for a skip. Everything made here carries
this process's id in its name; `Hosts.close` removes it all, and a later session removes what a killed
one left (`sweep`).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from services.coordinator.local import ROOT

DOCKER = os.path.join(ROOT, "docker")
_TAG = f"{os.getpid():x}"            # every name made here carries it: sweep() knows whose they are
_NAME = re.compile(r"rl[gbv]([0-9a-f]+)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why this machine cannot run the harness (None: it can): tries a namespace, a bridge and a veth."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2)"
    ns, bridge, veth = f"rlg{_TAG}p", f"rlb{_TAG}p", f"rlv{_TAG}p"
    try:
        for args in (["netns", "add", ns], ["link", "add", bridge, "type", "bridge"],
                     ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns]):
            done = _ip(*args, check=False)
            if done.returncode != 0:
                return f"`ip {' '.join(args[:2])} ...` is not allowed here: {done.stderr.strip()}"
        return None
    finally:
        _ip("link", "del", veth, check=False)
        _ip("link", "del", bridge, check=False)
        _ip("netns", "del", ns, check=False)


def sweep() -> None:
    """Removes namespaces, links and hosts files left by harness processes that no longer run."""
    def gone(name: str) -> bool:
        m = _NAME.match(name)
        if not m or m.group(1) == _TAG:
            return False
        try:
            os.kill(int(m.group(1), 16), 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if gone(name):
            _kill_all_in(name)
            _ip("netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if gone(name):
            _ip("link", "del", name, check=False)


def _kill_all_in(netns: str) -> None:
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Host:
    name: str
    netns: str
    ip: str
    link: str                    # the bridge-side end of its veth: down = the host is off the network
    procs: list[subprocess.Popen] = field(default_factory=list)


class Hosts:
    """A bridge in this namespace (this process reaches every host through it) and hosts on it."""

    def __init__(self, log_dir: str):
        sweep()
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.hosts: dict[str, Host] = {}
        self.names: dict[str, str] = {}          # host name -> ip, in every host's /etc/hosts
        self.bridge = f"rlb{_TAG}"
        self.subnet = _free_subnet()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        """A new host: namespace, veth (named eth0 inside, like a container's), address, hosts file."""
        n = len(self.hosts) + 2
        host = Host(name, f"rlg{_TAG}n{n}", f"{self.subnet}.{n}", f"rlv{_TAG}n{n}")
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.link, "master", self.bridge)
        _ip("link", "set", host.link, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        self.hosts[name] = host
        self.names[name] = host.ip
        self._write_hosts_files()
        return host

    def _write_hosts_files(self) -> None:
        """/etc/netns/<ns>/hosts, which `ip netns exec` shows its processes as /etc/hosts."""
        text = "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in self.names.items())
        for host in self.hosts.values():
            os.makedirs(f"/etc/netns/{host.netns}", exist_ok=True)
            with open(f"/etc/netns/{host.netns}/hosts", "w") as f:
                f.write(text)

    def alias(self, name: str, host: Host) -> None:
        """`name` resolves to `host` on every host (a compose service name)."""
        self.names[name] = host.ip
        self._write_hosts_files()

    def run(self, host: Host, argv: list[str], *, env: dict[str, str], cwd: str, log: str) -> subprocess.Popen:
        with open(os.path.join(self.log_dir, log), "w") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True)
        host.procs.append(proc)
        return proc

    def cut(self, host: Host) -> None:
        _ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.link, "up")

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.procs:
                try:
                    self.stop(proc)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            _kill_all_in(host.netns)
            _ip("link", "del", host.link, check=False)
            _ip("netns", "del", host.netns, check=False)
            shutil.rmtree(f"/etc/netns/{host.netns}", ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)


def _free_subnet() -> str:
    """A 10.231.x.0/24 no interface here uses."""
    used = _ip("-o", "-4", "addr", "show", check=False).stdout
    for x in [os.getpid() % 250, *range(250)]:
        if f" 10.231.{x}." not in used:
            return f"10.231.{x}"
    raise RuntimeError("no free 10.231.x.0/24 subnet")


# ---------------------------------------------------------------- compose.cpu.yaml's containers

_INTERPOLATION = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against `env`."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == "-" else ""
    return _INTERPOLATION.sub(one, value)


class ComposeProject:
    """docker/compose.cpu.yaml on Hosts: each container of a service (`--scale` makes several) is a host
    running the container's entrypoint and command, in a stand-in for the image's /app (a directory of
    links to this repository, with output/ pointing at the /output volume, as the image has it) and with
    the volumes' container paths mapped to directories here."""

    def __init__(self, hosts: Hosts, workdir: str, env: dict[str, str], compose_file: str = "compose.cpu.yaml"):
        from tests.unit.test_docker import instructions, service_argv  # the images' own ENTRYPOINT/CMD
        self.hosts, self.env = hosts, env
        with open(os.path.join(DOCKER, compose_file)) as f:
            self.compose = yaml.safe_load(f)
        with open(os.path.join(DOCKER, "Dockerfile")) as f:
            self.dockerfile = instructions(f.read())
        self._argv = service_argv
        self.mounts = {"/output": os.path.join(workdir, "output"), "/data": os.path.join(workdir, "data"),
                       "/models": os.path.join(workdir, "models")}
        for path in self.mounts.values():
            os.makedirs(path, exist_ok=True)
        self.app = os.path.join(workdir, "app")        # the image's WORKDIR, /app
        os.makedirs(self.app, exist_ok=True)
        for entry in ("services", "protos", "configs", "docker", "pyproject.toml"):
            os.symlink(os.path.join(ROOT, entry), os.path.join(self.app, entry))
        os.symlink(self.mounts["/output"], os.path.join(self.app, "output"))
        self.containers: dict[str, list[Host]] = {}

    def argv(self, service: str, extra: list[str] = ()) -> list[str]:
        entrypoint, command = self._argv(self.compose, self.dockerfile, service)
        argv = []
        for arg in [*entrypoint, *command, *extra]:
            if arg == "python":
                arg = sys.executable
            elif arg == "/opt/rlgrid/launch.py":
                arg = os.path.join(self.app, "docker", "launch.py")
            argv.append(re.sub(r"(?<![\w.])(/output|/data|/models)(?=/|$)", lambda m: self.mounts[m.group(1)], arg))
        return argv

    def environment(self, service: str) -> dict[str, str]:
        declared = self.compose["services"][service].get("environment") or {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
               "PYTHONPATH": f"{self.app}:{self.app}/protos", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.update({k: interpolate(str(v), self.env) for k, v in declared.items()})
        return env

    def up(self, service: str, *, extra: list[str] = (), env: dict[str, str] | None = None) -> Host:
        """Starts one more container of `service` on a new host (what `--scale service=N` does N times)."""
        index = len(self.containers.get(service, [])) + 1
        host = self.hosts.add(f"{service}-{index}")
        if index == 1:
            self.hosts.alias(service, host)   # the compose network's name for the service
        self.hosts.run(host, self.argv(service, list(extra)), env={**self.environment(service), **(env or {})},
                       cwd=self.app, log=f"{service}-{index}.log")
        self.containers.setdefault(service, []).append(host)
        return host

    def wait_serving(self, host: Host, port: int, timeout: float = 180.0) -> None:
        from services.common.rpc import wait_healthy
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_healthy(f"{host.ip}:{port}", timeout=5)
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or any(p.poll() is not None for p in host.procs):
                    raise RuntimeError(f"{host.name} did not come up on {host.ip}:{port}: {exc}\n"
                                       f"{self.log_tail(host)}") from exc
                time.sleep(0.5)

    def log_tail(self, host: Host, lines: int = 40) -> str:
        with open(os.path.join(self.hosts.log_dir, f"{host.name}.log")) as f:
            return "".join(f.readlines()[-lines:])
