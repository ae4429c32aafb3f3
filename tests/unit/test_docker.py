"""Static checks of docker/: the Dockerfile's targets, compose.yaml (GPU), compose.cpu.yaml (CPU)
and the container launcher.

No docker engine is needed: the files are parsed, every module and CLI flag they name is checked
against the services' own argparse parsers, the compose CLI validates both files where it is
installed (`docker-compose config`), and the launcher and the image's health check run against local
stand-ins. tests/integration/test_hosts.py runs compose.cpu.yaml's commands, one network namespace
per container.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from services.common.rpc import AUTH_ENV, HEALTH_PORT_ENV, Server
from services.coordinator.local import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
SERVICES = ("coordinator", "trainer", "rollout")
GPU_SERVICES = ("trainer", "rollout")
# torch that each vLLM release pins (its wheel's Requires-Dist); the base image must carry it.
VLLM_TORCH_PIN = {"0.26.0": "2.11.0"}


# ---------------------------------------------------------------- Dockerfile parsing

@dataclass
class Instruction:
    stage: str | None
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out, stage, buf = [], None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        full, buf = (buf + stripped).strip(), ""
        if not full:
            continue
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?\s*$", args.strip(), re.IGNORECASE)
            assert m, f"cannot read FROM {args!r}"
            stage = (m.group(2) or m.group(1)).lower()
        out.append(Instruction(stage, keyword, args.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def build_args(instrs: list[Instruction], **given: str) -> dict[str, str]:
    """The global ARGs (before the first FROM) with their defaults, overridden by `given` (--build-arg)."""
    args = {}
    for ins in instrs:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip()
    return {**args, **given}


def stages(instrs: list[Instruction], **given: str) -> dict[str, str]:
    """stage name -> what it is FROM, the global ARGs expanded (defaults, or `given`)."""
    args = build_args(instrs, **given)
    result = {}
    for ins in instrs:
        if ins.keyword == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.IGNORECASE)
            if m.group(2):
                parent = re.sub(r"\$\{(\w+)\}", lambda v: args.get(v.group(1), v.group(0)), m.group(1))
                result[m.group(2).lower()] = parent.lower()
    return result


def chain(instrs: list[Instruction], stage: str, **given: str) -> list[str]:
    """The stage and its ancestors within this Dockerfile, nearest first (`given`: build args)."""
    parents, out = stages(instrs, **given), []
    while stage in parents:
        out.append(stage)
        stage = parents[stage]
    return out


def effective(instrs: list[Instruction], stage: str, keyword: str) -> Instruction | None:
    """The last `keyword` instruction that applies to `stage` (inherited from its ancestors)."""
    for name in chain(instrs, stage):
        found = [i for i in instrs if i.stage == name and i.keyword == keyword]
        if found:
            return found[-1]
    return None


def exec_form(args: str) -> list[str]:
    value = json.loads(args)   # shell form would not parse: exec form is required
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def pip_installs(instrs: list[Instruction]) -> list[tuple[str, list[str]]]:
    """(stage, argv) of every `pip install` in a RUN."""
    found = []
    for ins in instrs:
        if ins.keyword != "RUN":
            continue
        lexer = shlex.shlex(ins.args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, "&&"]:
            if token in ("&&", "||", ";", "|"):
                if argv[:2] == ["pip", "install"] or argv[1:4] == ["-m", "pip", "install"]:
                    found.append((ins.stage, argv))
                argv = []
            else:
                argv.append(token)
    return found


# ---------------------------------------------------------------- compose and services

@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def load_launch():
    spec = importlib.util.spec_from_file_location("rlgrid_docker_launch", DOCKER / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_has_main(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__main__.py").is_file()


def invoked_module(argv: list[str]) -> str:
    """The services.X module an entrypoint runs: `python -m X` or `python .../launch.py X`."""
    if "-m" in argv:
        return argv[argv.index("-m") + 1]
    launcher = [i for i, a in enumerate(argv) if a.endswith("launch.py")]
    assert launcher, f"entrypoint {argv} runs neither `python -m services.X` nor launch.py"
    return argv[launcher[0] + 1]


def service_argv(compose: dict, dockerfile: list[Instruction], name: str) -> tuple[list[str], list[str]]:
    """(entrypoint, args) a compose service's container runs, compose overriding the image."""
    svc = compose["services"][name]
    target = svc["build"]["target"]
    entrypoint = svc.get("entrypoint")
    if entrypoint is None:
        entrypoint = exec_form(effective(dockerfile, target, "ENTRYPOINT").args)
    command = svc.get("command")
    if command is None:
        command = exec_form(effective(dockerfile, target, "CMD").args) if "entrypoint" not in svc else []
    assert isinstance(entrypoint, list) and isinstance(command, list), \
        f"{name}: write entrypoint and command as lists (exec form)"
    return [str(a) for a in entrypoint], [str(a) for a in command]


class _Parsed(Exception):
    pass


def parse_service_args(module: str, args: list[str]) -> argparse.Namespace:
    """Runs `module`'s server main() up to its parse_args, on `args`: the service's own parser."""
    return parse_module_args(importlib.import_module(module + ".server"), args)


def parse_module_args(server, args: list[str]) -> argparse.Namespace:
    """Runs `server.main()` up to its parse_args, on `args`."""
    module = server.__name__
    real = argparse.ArgumentParser.parse_args

    def capture(self, _args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        try:
            server.main()
        except _Parsed as parsed:
            return parsed.args[0]
        except SystemExit as exc:
            pytest.fail(f"{module} rejects {args}: argparse exited {exc.code} (see stderr)")
    pytest.fail(f"{module}.main() returned without parsing arguments")


def volume_target(spec: str) -> str:
    return re.sub(r"\$\{[^}]*\}", "X", spec).split(":")[1]


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_has_the_three_targets(dockerfile):
    names = stages(dockerfile)
    for target in SERVICES:
        assert target in names, f"no `FROM ... AS {target}` stage"


def test_copy_sources_exist(dockerfile):
    for ins in dockerfile:
        if ins.keyword == "COPY" and "--from" not in ins.args:
            *sources, _dest = ins.args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"


def test_entrypoints_run_their_service_module(dockerfile):
    for target in SERVICES:
        ins = effective(dockerfile, target, "ENTRYPOINT")
        assert ins is not None, f"{target} has no ENTRYPOINT"
        assert exec_form(ins.args) == ["python", "-m", f"services.{target}"]
        assert module_has_main(f"services.{target}")


def test_default_cmds_parse_and_ports_match_expose_and_healthcheck(dockerfile):
    for target in SERVICES:
        args = exec_form(effective(dockerfile, target, "CMD").args)
        ns = parse_service_args(f"services.{target}", args)
        expose = effective(dockerfile, target, "EXPOSE").args.split()
        assert str(ns.port) in expose, f"{target}: --port {ns.port} not EXPOSEd ({expose})"
        if target == "coordinator":
            assert str(ns.metrics_port) in expose
        health = effective(dockerfile, target, "HEALTHCHECK")
        assert health is not None, f"{target} has no HEALTHCHECK"
        argv = exec_form(health.args[health.args.index("CMD") + 3:].strip())
        assert argv[:2] == ["python", "-c"] and "grpc_health.v1" in argv[2]
        assert f"'127.0.0.1:' + os.environ['{HEALTH_PORT_ENV}']" in argv[2], \
            f"{target}: the health check does not probe the health port"
        with pytest.MonkeyPatch.context() as mp:   # the image's env gives every service its health port
            mp.setenv(HEALTH_PORT_ENV, image_env(dockerfile, target)[HEALTH_PORT_ENV])
            health_port = parse_service_args(f"services.{target}", args).health_port
        assert health_port == int(image_env(dockerfile, target)[HEALTH_PORT_ENV]) > 0
        assert str(health_port) not in expose, "the health port is for probes inside the container"


def image_env(instrs: list[Instruction], stage: str) -> dict[str, str]:
    """The ENV a stage runs with (its ancestors' first); only KEY=VALUE pairs without spaces."""
    env: dict[str, str] = {}
    for name in reversed(chain(instrs, stage)):
        for ins in instrs:
            if ins.stage == name and ins.keyword == "ENV":
                env |= dict(pair.split("=", 1) for pair in ins.args.split() if "=" in pair)
    return env


def test_healthcheck_passes_with_tls_and_a_token_on_the_api_port(dockerfile, tmp_path):
    """The images' probe speaks plaintext to the loopback health port: it passes against a server whose
    API port needs TLS and a token (where a plaintext probe of the API port fails), and fails once no
    server listens."""
    from services.common.rpc import ServerTLS
    from tests.certs import make_local_tls
    certs = make_local_tls(str(tmp_path))
    server = Server([], host="127.0.0.1", port=0, auth_token="a-token", health_port=free_port(),
                    tls=ServerTLS(certs.cert, certs.key, certs.ca))   # mutual TLS: no client cert, no call
    try:
        for target in SERVICES:
            health = effective(dockerfile, target, "HEALTHCHECK")
            code = exec_form(health.args[health.args.index("CMD") + 3:].strip())[2]
            env = {**os.environ, HEALTH_PORT_ENV: str(server.health_port)}
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
            assert done.returncode == 0, f"{target} health check failed: {done.stderr}"
        api = {**os.environ, HEALTH_PORT_ENV: str(server.port)}   # the same probe against the TLS port
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=api).returncode != 0
    finally:
        server.stop(0)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0, "the health check passes with no server listening"


def test_project_installed_without_deps_and_torch_never_installed(dockerfile):
    installs = pip_installs(dockerfile)
    assert installs, "the Dockerfile installs nothing with pip"
    project = [(stage, argv) for stage, argv in installs if {"/app", "."} & set(argv)]
    assert {stage for stage, _ in project} >= {"app", "rollout"}, project
    for stage, argv in project:
        assert "--no-deps" in argv, f"{stage}: {' '.join(argv)} would install pyproject's torch==2.13.0"
        assert "-e" not in argv and "--editable" not in argv
    for stage, argv in installs:
        for arg in argv[2:]:
            assert not re.match(r"(torch|torchvision|torchaudio)\b", arg), f"{stage}: pip installs {arg}"
    # every pip install runs under PIP_CONSTRAINT (the frozen torch stack), set in `base`
    envs = [i for i in dockerfile if i.keyword == "ENV" and re.match(r"PIP_CONSTRAINT[= ]", i.args)]
    assert envs and envs[0].stage == "base", "no ENV PIP_CONSTRAINT=<frozen torch stack> in base"
    constraints = re.split(r"[= ]", envs[0].args, maxsplit=1)[1].strip()
    assert any(i.keyword == "RUN" and f"torch-constraints > {constraints}" in i.args
               for i in dockerfile[:dockerfile.index(envs[0])]), "PIP_CONSTRAINT is not the frozen torch stack"
    first_pip = next(n for n, i in enumerate(dockerfile) if i.keyword == "RUN" and "pip install" in i.args)
    assert dockerfile.index(envs[0]) < first_pip
    for stage, _ in installs:
        assert "base" in chain(dockerfile, stage), f"stage {stage} does not build on base"


def test_requirements_script_lists_pyproject_deps_minus_torch():
    spec = importlib.util.spec_from_file_location("rlgrid_docker_requirements", DOCKER / "requirements.py")
    req = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(req)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = req.project_deps(str(ROOT / "pyproject.toml"))
    assert not [d for d in listed if req._name(d) == "torch"]
    assert listed == [d for d in deps if req._name(d) not in req.TORCH_STACK]
    assert any(req._name(d) == "torch" for d in deps), "pyproject no longer lists torch: revisit docker/"
    pins = req.torch_constraints()
    import torch
    assert pins[0] == f"torch=={importlib.metadata.version('torch')}" and torch.__version__.split("+")[0] in pins[0]


def test_vllm_pin_matches_base_image_torch(dockerfile):
    base = next(i for i in dockerfile if i.keyword == "ARG" and i.args.startswith("BASE_IMAGE="))
    m = re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base.args)
    assert m, f"BASE_IMAGE should be an official pytorch/pytorch CUDA runtime tag: {base.args}"
    vllm = [a for stage, argv in pip_installs(dockerfile) for a in argv if a.startswith("vllm")]
    assert len(vllm) == 1 and re.fullmatch(r"vllm==[\d.]+", vllm[0]), f"vllm must be pinned once: {vllm}"
    version = vllm[0].split("==")[1]
    assert version in VLLM_TORCH_PIN, f"add vllm {version}'s torch pin to VLLM_TORCH_PIN"
    assert VLLM_TORCH_PIN[version] == m.group(1), \
        f"vllm {version} needs torch {VLLM_TORCH_PIN[version]}, the base image has {m.group(1)}"
    rollout_stages = chain(dockerfile, "rollout")
    assert all(stage in rollout_stages for stage, argv in pip_installs(dockerfile) if vllm[0] in argv)


def test_dockerignore_keeps_heavy_and_local_dirs_out():
    ignored = {line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()}
    for path in (".git", ".venv", "output", "models", "data"):
        assert path in ignored, f"{path} would be sent to the builder"


# ---------------------------------------------------------------- compose.yaml

def test_compose_has_the_services_built_from_dockerfile_targets(compose, dockerfile):
    assert set(SERVICES) <= set(compose["services"])
    names = stages(dockerfile)
    for name in SERVICES:
        build = compose["services"][name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in names, f"{name}: no `FROM ... AS {build['target']}` in the Dockerfile"
        assert build["target"] == name


def test_scaled_services_publish_no_host_port(compose):
    for name in GPU_SERVICES:
        svc = compose["services"][name]
        assert not svc.get("ports"), f"{name} publishes host ports: `--scale {name}=2` would clash"
        assert "container_name" not in svc and svc.get("network_mode") != "host"


def test_every_module_named_exists(compose, dockerfile):
    texts = [i.args for i in dockerfile if i.keyword in ("ENTRYPOINT", "CMD", "RUN")]
    for name in SERVICES:
        texts += [json.dumps(compose["services"][name].get(k)) for k in ("entrypoint", "command")]
    modules = {m for t in texts for m in re.findall(r"-m\s*\W*\s*(services(?:\.\w+)+)", t)}
    modules |= {m for t in texts for m in re.findall(r"\"(services\.\w+)\"", t)}
    assert {f"services.{s}" for s in SERVICES} <= modules
    for module in modules:
        if module.count(".") == 1:
            assert module_has_main(module), f"`python -m {module}`: no {module.replace('.', '/')}/__main__.py"


def test_compose_commands_use_flags_the_services_accept(compose, dockerfile, monkeypatch):
    launch = load_launch()
    for name in SERVICES:
        entrypoint, args = service_argv(compose, dockerfile, name)
        module = invoked_module(entrypoint)
        assert module == f"services.{name}" and module_has_main(module)
        if any(a.endswith("launch.py") for a in entrypoint):
            monkeypatch.setenv(launch.HOST_ENV, "10.0.0.7")
            args = launch.with_advertise(module, args)
            monkeypatch.delenv(launch.HOST_ENV)
        env = image_env(dockerfile, name) | {k: str(v) for k, v in (compose["services"][name].get("environment")
                                                                     or {}).items()}
        monkeypatch.setenv(HEALTH_PORT_ENV, env[HEALTH_PORT_ENV])
        ns = parse_service_args(module, args)
        monkeypatch.delenv(HEALTH_PORT_ENV)
        assert ns.health_port == int(env[HEALTH_PORT_ENV]) > 0, \
            f"{name}: --health-port {ns.health_port} is not the port the image's health check probes"


def test_compose_wiring(compose, dockerfile):
    svcs = compose["services"]
    _, coord_args = service_argv(compose, dockerfile, "coordinator")
    coord = parse_service_args("services.coordinator", coord_args)
    assert coord.advertise_host == "coordinator", "the weight-sync rendezvous must be reachable by service name"
    assert coord.state_dir.startswith("/output/")
    published = [str(p) for p in svcs["coordinator"].get("ports", [])]
    assert f"{coord.port}:{coord.port}" in published
    # Prometheus has no auth: published on the host's loopback only
    assert f"127.0.0.1:{coord.metrics_port}:{coord.metrics_port}" in published
    launch = load_launch()
    for name in GPU_SERVICES:
        entrypoint, args = service_argv(compose, dockerfile, name)
        assert any(a == "/opt/rlgrid/launch.py" for a in entrypoint), f"{name} must start through the launcher"
        ns = parse_service_args(f"services.{name}", args)
        assert ns.coordinator == f"coordinator:{coord.port}"
        assert ns.advertise is None, f"{name}: a fixed --advertise breaks --scale (the launcher adds one)"
        svc = svcs[name]
        env = svc["environment"]
        assert int(env["RLGRID_GPUS"]) >= 1 and env.get("NCCL_SOCKET_IFNAME") == "eth0"
        mounts = {volume_target(v) for v in svc["volumes"]}
        assert env.get(launch.LOCK_DIR_ENV, launch.DEFAULT_LOCK_DIR) in mounts, f"{name}: GPU lock dir not shared"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert svc.get("shm_size")
    copies = [i.args for i in dockerfile if i.keyword == "COPY" and i.stage == "base"]
    assert any("docker/launch.py" in c and c.split()[-1].rstrip("/") == "/opt/rlgrid" for c in copies)


def test_compose_volumes_and_auth_token(compose):
    for name in SERVICES:
        svc = compose["services"][name]
        mounts = {volume_target(v) for v in svc["volumes"]}
        assert {"/models", "/data", "/output"} <= mounts, f"{name} lacks a shared mount: {mounts}"
        # compose refuses to start without a token (`${VAR:?message}` fails on unset or empty)
        assert re.fullmatch(r"\$\{%s:\?[^}]+\}" % AUTH_ENV, svc["environment"][AUTH_ENV]), svc["environment"]


def test_services_listen_beyond_loopback_with_paths_confined_to_the_mounts(compose, dockerfile, monkeypatch):
    """Containers serve on all their interfaces (so they need the token) and every client path is
    confined to a mount: outputs to /output, prompts to /data, models to /models or /output."""
    launch = load_launch()
    want = {"output_root": ["/output"], "data_root": ["/data"], "model_root": ["/models", "/output"]}
    for name in SERVICES:
        for args in (service_argv(compose, dockerfile, name)[1], exec_form(effective(dockerfile, name, "CMD").args)):
            if name != "coordinator":
                monkeypatch.setenv(launch.HOST_ENV, "10.0.0.7")
                args = launch.with_advertise(f"services.{name}", args)
            ns = parse_service_args(f"services.{name}", args)
            assert ns.host == "0.0.0.0" and not ns.insecure_no_auth, f"{name}: {args}"
            for key, dirs in want.items():
                if hasattr(ns, key):
                    assert getattr(ns, key) == dirs, f"{name}: --{key.replace('_', '-')} {getattr(ns, key)}"
            assert hasattr(ns, "model_root") and (name == "rollout" or hasattr(ns, "output_root"))


# ---------------------------------------------------------------- the launcher

def test_launcher_adds_advertise_from_port(monkeypatch):
    launch = load_launch()
    monkeypatch.setenv(launch.HOST_ENV, "10.1.2.3")
    assert launch.with_advertise("services.rollout", ["--coordinator", "c:1"]) == \
        ["--coordinator", "c:1", "--advertise", "10.1.2.3:50052"]
    assert launch.with_advertise("services.trainer", ["--port=6000"])[-1] == "10.1.2.3:6000"
    assert launch.with_advertise("services.rollout", ["--advertise", "me:1"]) == ["--advertise", "me:1"]
    assert launch.with_advertise("services.coordinator", ["--port", "1"]) == ["--port", "1"]


def test_launcher_address_falls_back_and_refuses_loopback(monkeypatch):
    launch = load_launch()
    monkeypatch.delenv(launch.HOST_ENV, raising=False)
    monkeypatch.setattr(launch.socket, "gethostname", lambda: "localhost")
    with pytest.raises(SystemExit, match="RLGRID_ADVERTISE_HOST"):
        launch.own_ip("no-such-host.invalid:50050")     # unresolvable, and the hostname is loopback
    monkeypatch.setattr(launch.socket, "gethostbyname", lambda host: "172.18.0.5")
    assert launch.own_ip(None) == "172.18.0.5"


def test_launcher_claims_distinct_gpus(tmp_path):
    launch = load_launch()
    gpus = ["GPU-aaaa", "GPU-bbbb"]
    first, fds1 = launch.claim_gpus(1, gpus, str(tmp_path))
    second, fds2 = launch.claim_gpus(1, gpus, str(tmp_path))
    assert first == ["GPU-aaaa"] and second == ["GPU-bbbb"]
    with pytest.raises(SystemExit, match="free GPU"):
        launch.claim_gpus(1, gpus, str(tmp_path))
    for fd in fds1:
        os.close(fd)          # the container holding GPU-aaaa stopped
    again, fds3 = launch.claim_gpus(1, gpus, str(tmp_path))
    assert again == ["GPU-aaaa"]
    for fd in fds2 + fds3:
        os.close(fd)


def test_launcher_lock_survives_exec_until_the_service_exits(tmp_path):
    """The claim is held by the exec'd service process, and freed when it exits."""
    code = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('l', {str(DOCKER / 'launch.py')!r})\n"
        "l = importlib.util.module_from_spec(spec); spec.loader.exec_module(l)\n"
        f"l.claim_gpus(1, ['GPU-x'], {str(tmp_path)!r})\n"
        "os.execv(sys.executable, [sys.executable, '-c', "
        "'import sys; print(\"ready\", flush=True); sys.stdin.readline()'])\n"
    )
    launch = load_launch()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"     # now running the exec'd program
        with pytest.raises(SystemExit, match="free GPU"):
            launch.claim_gpus(1, ["GPU-x"], str(tmp_path))
    finally:
        proc.communicate("\n", timeout=30)
    claimed, fds = launch.claim_gpus(1, ["GPU-x"], str(tmp_path))
    assert claimed == ["GPU-x"]
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("module,gpus,torchrun", [("services.trainer", "2", True), ("services.trainer", "1", False),
                                                  ("services.rollout", "2", False)])
def test_launcher_runs_a_multi_gpu_trainer_under_torchrun(monkeypatch, module, gpus, torchrun):
    launch = load_launch()
    seen = {}
    monkeypatch.setenv("RLGRID_GPUS", gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")          # pinned by hand: no claiming
    monkeypatch.setattr(launch.os, "execv", lambda exe, cmd: seen.setdefault("cmd", cmd))
    launch.main([module, "--port", "50051", "--advertise", "10.0.0.2:50051"])
    cmd = seen["cmd"]
    assert ("torch.distributed.run" in cmd) == torchrun
    assert cmd[cmd.index(module) - 1] == "-m" and cmd[-2:] == ["--advertise", "10.0.0.2:50051"]
    if torchrun:
        assert f"--nproc-per-node={gpus}" in cmd


def test_trainer_image_installs_the_megatron_extra(dockerfile):
    spec = importlib.util.spec_from_file_location("rlgrid_docker_requirements", DOCKER / "requirements.py")
    req = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(req)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["megatron"]
    assert req.project_extra(str(ROOT / "pyproject.toml"), "megatron") == extra
    runs = " ".join(i.args for i in dockerfile if i.stage == "trainer" and i.keyword == "RUN")
    assert "project-extra /opt/rlgrid/pyproject.toml megatron" in runs and "import megatron.core" in runs
    assert "transformer" not in " ".join(extra).replace("megatron-core", "")   # no Transformer Engine


# ---------------------------------------------------------------- compose.cpu.yaml: the same topology on CPU

@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    data = yaml.safe_load(COMPOSE_CPU.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def compose_cli() -> list[str] | None:
    """The compose CLI: `docker compose` (v2 plugin) or `docker-compose` (Debian's package)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=["gpu", "cpu"])
def test_the_compose_cli_accepts_the_file_and_demands_the_token(path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI here (Debian: apt-get install docker-compose; .ci/run installs it)")
    env = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
    done = subprocess.run([*cli, "-f", str(path), "config"], capture_output=True, text=True, timeout=120,
                          env={**env, AUTH_ENV: "a-token"})
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert {"coordinator", "trainer", "rollout"} <= set(resolved["services"])
    refused = subprocess.run([*cli, "-f", str(path), "config"], capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and AUTH_ENV in refused.stderr + refused.stdout


def test_cpu_compose_is_the_gpu_topology_on_cpu_images(compose, compose_cpu, dockerfile, monkeypatch):
    launch = load_launch()
    monkeypatch.setenv(launch.HOST_ENV, "10.0.0.7")
    for name in SERVICES:
        gpu, cpu = compose["services"][name], compose_cpu["services"][name]
        assert cpu["build"]["target"] == gpu["build"]["target"] == name
        assert (COMPOSE_CPU.parent / cpu["build"]["context"]).resolve() == ROOT
        assert cpu["build"]["dockerfile"] == gpu["build"]["dockerfile"]
        assert cpu["build"]["args"]["DEVICE"] == "cpu" and "deploy" not in cpu and "RLGRID_GPUS" not in cpu["environment"]
        assert cpu.get("entrypoint") == gpu.get("entrypoint")
        a = parse_service_args(f"services.{name}", launch.with_advertise(f"services.{name}",
                                                                        service_argv(compose, dockerfile, name)[1]))
        b = parse_service_args(f"services.{name}", launch.with_advertise(f"services.{name}",
                                                                        service_argv(compose_cpu, dockerfile, name)[1]))
        same = {k for k in vars(a) if k not in ("device", "data_root")}
        assert {k: vars(a)[k] for k in same} == {k: vars(b)[k] for k in same}, name
        if name != "coordinator":
            assert a.device.startswith("cuda") and b.device == "cpu"
            assert cpu["environment"]["GLOO_SOCKET_IFNAME"] == "eth0" and not cpu.get("ports")
    coord = parse_service_args("services.coordinator", service_argv(compose_cpu, dockerfile, "coordinator")[1])
    assert coord.data_root == ["/data", "/output"], "the demo's toy data is written to /output"
    assert [str(p) for p in compose_cpu["services"]["coordinator"]["ports"]] == \
        ["127.0.0.1:50050:50050", "127.0.0.1:9400:9400"]
    for name, svc in compose_cpu["services"].items():
        assert re.fullmatch(r"\$\{%s:\?[^}]+\}" % AUTH_ENV, svc["environment"][AUTH_ENV]), name


def test_cpu_demo_service_drives_the_coordinator(compose_cpu, dockerfile):
    demo = compose_cpu["services"]["demo"]
    entrypoint, args = service_argv(compose_cpu, dockerfile, "demo")
    assert entrypoint[:3] == ["python", "-m", "services.coordinator.demo"]
    demo_module = importlib.import_module("services.coordinator.demo")
    ns = parse_module_args(demo_module, entrypoint[3:] + args)
    assert ns.coordinator == "coordinator:50050" and not ns.prepare
    assert demo["healthcheck"]["disable"] is True, "the coordinator image's health check does not apply to a client"
    assert "/output" in {volume_target(v) for v in demo["volumes"]}


def test_cpu_images_take_pyprojects_torch_and_no_vllm(dockerfile):
    req = load_requirements()
    pyproject = str(ROOT / "pyproject.toml")
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if req._name(d) == "torch")
    assert req.torch_install("cuda", pyproject) is None, "GPU images keep the base image's CUDA torch"
    assert req.torch_install("cpu", pyproject)[-4:] == ["-m", "pip", "install", pin]
    assert req.torch_install("cpu", pyproject, "https://example.invalid/whl")[-3:] == \
        ["--index-url", "https://example.invalid/whl", pin]
    assert req.check_torch("cpu", pyproject).startswith("torch 2.13.0")
    with pytest.raises(SystemExit, match="DEVICE"):
        req.torch_install("tpu", pyproject)
    runs = [i.args for i in dockerfile if i.stage == "base" and i.keyword == "RUN"]
    assert any('requirements.py torch "${DEVICE}"' in r for r in runs), "base installs no torch for DEVICE=cpu"
    assert build_args(dockerfile)["DEVICE"] == "cuda", "the default build is the GPU one"
    vllm_stages = {stage for stage, argv in pip_installs(dockerfile) if any(a.startswith("vllm") for a in argv)}
    assert vllm_stages and vllm_stages <= set(chain(dockerfile, "rollout"))
    assert not vllm_stages & set(chain(dockerfile, "rollout", DEVICE="cpu")), "vLLM in the CPU rollout image"
    for target in SERVICES:   # every target builds on base for either device
        assert "base" in chain(dockerfile, target, DEVICE="cpu") and "base" in chain(dockerfile, target)


def load_requirements():
    spec = importlib.util.spec_from_file_location("rlgrid_docker_requirements", DOCKER / "requirements.py")
    req = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(req)
    return req
