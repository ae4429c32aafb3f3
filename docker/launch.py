"""Container launcher for the GPU services: `python launch.py services.rollout [ARGS...]`.

Runs `python -m services.rollout ARGS...` (exec: the service becomes the container's process)
after doing the two things that depend on which container of a scaled service this is:

1. --advertise. Every replica must register an address the coordinator can reach, so unless
   ARGS already has --advertise, it adds `--advertise <this container's IP>:<its --port>`. The IP
   is $RLGRID_ADVERTISE_HOST if set, else the address of the interface that routes to the
   --coordinator host, else the address the container's hostname resolves to.

2. A GPU of its own. Docker gives every replica of a service the same GPUs (`count: 1` is GPU 0
   for all of them), so compose gives each GPU service all GPUs and this claims $RLGRID_GPUS of
   them (default 0: none) by taking an exclusive flock on <RLGRID_GPU_LOCK_DIR>/<gpu uuid>.lock,
   a directory shared by all GPU containers of the host, then sets CUDA_VISIBLE_DEVICES to the
   claimed GPUs. The lock fds are inherited by the service, so a GPU is freed when its container
   stops. A CUDA_VISIBLE_DEVICES already set in the environment wins over claiming.

Standard library only: it runs before anything else in the image.
"""
from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys

DEFAULT_PORTS = {"services.coordinator": 50050, "services.trainer": 50051, "services.rollout": 50052}
LOCK_DIR_ENV, GPUS_ENV, HOST_ENV = "RLGRID_GPU_LOCK_DIR", "RLGRID_GPUS", "RLGRID_ADVERTISE_HOST"
DEFAULT_LOCK_DIR = "/run/rlgrid-gpus"


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value given for `flag` (argparse semantics: `--flag v` or `--flag=v`)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def own_ip(coordinator: str | None) -> str:
    """This container's address as seen by the coordinator."""
    if os.environ.get(HOST_ENV):
        return os.environ[HOST_ENV]
    if coordinator:
        host = coordinator.rsplit(":", 1)[0].strip("[]")
        try:  # a UDP connect sends nothing; it only picks the outgoing interface
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, 9))
                ip = s.getsockname()[0]
            if not ip.startswith("127."):
                return ip
        except OSError:
            pass
    ip = socket.gethostbyname(socket.gethostname())
    if ip.startswith("127."):
        raise SystemExit(f"launch: cannot tell this container's address (hostname resolves to {ip}); "
                         f"set {HOST_ENV} or pass --advertise host:port")
    return ip


def with_advertise(module: str, args: list[str]) -> list[str]:
    """ARGS plus --advertise <ip>:<port> unless it is there already (the coordinator has none)."""
    if module == "services.coordinator" or flag_value(args, "--advertise") is not None:
        return list(args)
    port = flag_value(args, "--port") or str(DEFAULT_PORTS.get(module, 0))
    return [*args, "--advertise", f"{own_ip(flag_value(args, '--coordinator'))}:{port}"]


def list_gpus() -> list[str]:
    """GPU UUIDs visible in this container (nvidia-smi), else indices from /dev/nvidiaN."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        uuids = [line.strip() for line in out.splitlines() if line.strip()]
        if uuids:
            return uuids
    except (OSError, subprocess.SubprocessError):
        pass
    # without nvidia-smi: /dev/nvidiaN minors, in PCI bus order like CUDA_DEVICE_ORDER=PCI_BUS_ID
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    try:
        names = os.listdir("/dev")
    except OSError:
        return []
    return [str(i) for i in sorted(int(n[6:]) for n in names if n.startswith("nvidia") and n[6:].isdigit())]


def claim_gpus(count: int, gpus: list[str], lock_dir: str) -> tuple[list[str], list[int]]:
    """Claims `count` GPUs not claimed by another live process: (claimed ids, lock fds to keep)."""
    os.makedirs(lock_dir, exist_ok=True)
    claimed, fds = [], []
    for gpu in gpus:
        if len(claimed) == count:
            break
        fd = os.open(os.path.join(lock_dir, gpu.replace("/", "_") + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        os.set_inheritable(fd, True)   # held by the service after exec, released when it exits
        claimed.append(gpu)
        fds.append(fd)
    if len(claimed) < count:
        for fd in fds:
            os.close(fd)
        raise SystemExit(f"launch: wanted {count} free GPU(s), {len(gpus)} visible and only {len(claimed)} "
                         f"unclaimed (locks in {lock_dir}); scale down or add GPUs")
    return claimed, fds


def main(argv: list[str]) -> None:
    if not argv or not argv[0].startswith("services."):
        raise SystemExit("usage: launch.py services.<name> [ARGS...]")
    module, args = argv[0], argv[1:]
    count = int(os.environ.get(GPUS_ENV) or 0)
    if count > 0 and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        gpus = list_gpus()
        claimed, _ = claim_gpus(count, gpus, os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
        print(f"launch: {module} claimed GPU(s) {','.join(claimed)}", file=sys.stderr, flush=True)
    args = with_advertise(module, args)
    # a trainer given several GPUs runs one rank per GPU under torchrun (rank r on cuda:r)
    ranks = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}"] \
        if module == "services.trainer" and count > 1 else []
    command = [sys.executable, *ranks, "-m", module, *args]
    print(f"launch: {' '.join(command)}", file=sys.stderr, flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main(sys.argv[1:])
