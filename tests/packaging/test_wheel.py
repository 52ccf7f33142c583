"""The wheel is the product: built from the sources, installed into fresh virtual environments
outside the checkout, one extra at a time, and run as a user would.

- the wheel carries the CRDs (the package's crds/, the one copy) and the three console scripts;
- the base install runs ``cloud-connector --help``, and each component whose extra is missing
  says so in one line naming the pip command;
- ``[proxy]`` brings no cloud SDK and no operator framework, and the proxy starts with it alone
  against the real API server and OpenBao;
- ``[proxy,aws]`` runs ``cloud-connector run`` on the demo's manifests against moto (the demo's
  AWS stand-in) until every device is Ready, and serves the proxy in watch mode;
- ``[operator]`` alone imports the operator, and carries no TLS internals of the proxy.

Dependencies come from a wheelhouse kept between runs (``$CLOUDCONNECTOR_WHEELHOUSE``, default
``~/.cache/cloud-connector/wheelhouse``), filled by ``pip download`` from the package index only
when a requirement is missing from it; installs are offline (``--no-index --find-links``) and go
through uv, which takes seconds where pip takes tens of seconds for botocore alone. What an extra
brings is decided by the wheel's own metadata, the same for pip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudconnector.demo.manifests import write_manifests
from cloudconnector.demo.pki import DemoCA
from tests.support.kube import Kube
from tests.support.procs import Bao, Moto, free_port, port_open, wait_for

REPO = Path(__file__).resolve().parents[2]
UV = str(Path(sys.executable).with_name("uv"))
WHEELHOUSE = Path(
    os.environ.get("CLOUDCONNECTOR_WHEELHOUSE") or Path.home() / ".cache" / "cloud-connector" / "wheelhouse"
)
CRDS = ("devices.yaml", "endpoints.yaml", "groups.yaml")
# What the proxy must never carry: cloud SDKs, the operator framework, the old registry SDK's stack.
NOT_IN_PROXY = {
    "kopf",
    "boto3",
    "botocore",
    "s3transfer",
    "azure-iot-hub",
    "uamqp",
    "msrest",
    "moto",
    "cmake",
}
NOT_IN_OPERATOR = {"pyopenssl", "uvloop", "prometheus-client", "azure-iot-hub", "uamqp", "msrest", "cmake"}


def _run(
    args: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of what the images' build context holds (never in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "cloudconnector", src / "cloudconnector", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path_factory.mktemp("dist")
    done = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ]
    )
    assert done.returncode == 0, done.stderr
    (built,) = dist.glob("cloud_connector-*.whl")
    return built


@dataclass
class Venv:
    root: Path
    wheel: Path
    home: Path  # the working directory and HOME of every command: outside the checkout

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def install(self, extras: str = "") -> None:
        spec = f"{self.wheel}[{extras}]" if extras else str(self.wheel)
        offline = [
            *(UV, "pip", "install", "-q", "--python", str(self.bin / "python"), "--offline", "--no-index"),
            *("--find-links", str(WHEELHOUSE), "--find-links", str(self.wheel.parent), spec),
        ]
        done = _run(offline)
        if done.returncode != 0:  # first run on this machine, or a new requirement: fill the wheelhouse
            WHEELHOUSE.mkdir(parents=True, exist_ok=True)
            fetch = _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "-d",
                    str(WHEELHOUSE),
                    "--only-binary=:all:",
                    spec,
                ]
            )
            assert fetch.returncode == 0, fetch.stderr[-2000:]
            for stale in WHEELHOUSE.glob("cloud_connector-*"):  # only the wheel under test may be found
                stale.unlink()
            done = _run(offline)
        assert done.returncode == 0, done.stderr[-2000:]

    def packages(self) -> set[str]:
        done = _run([UV, "pip", "freeze", "--python", str(self.bin / "python")])
        assert done.returncode == 0, done.stderr
        return {line.split("==")[0].lower().replace("_", "-") for line in done.stdout.split()}

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE")}
        return {**keep, "PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.home), **(extra or {})}

    def run(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return _run([str(self.bin / args[0]), *args[1:]], env=self.env(env), cwd=self.home)

    def start(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(self.bin / args[0]), *args[1:]],
            env=self.env(env),
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def _venv(wheel: Path, tmp: Path) -> Venv:
    root, home = tmp / "venv", tmp / "home"
    home.mkdir()
    done = _run([UV, "venv", "-q", "--python", sys.executable, str(root)])
    assert done.returncode == 0, done.stderr
    return Venv(root, wheel, home)


@pytest.fixture(scope="module")
def user(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """One user's environment, extended extra by extra as the tests below go."""
    venv = _venv(wheel, tmp_path_factory.mktemp("user"))
    venv.install()
    yield venv


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def test_wheel_carries_the_crds_and_the_commands(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        for crd in CRDS:
            assert f"cloudconnector/crds/{crd}" in names
            assert whl.read(f"cloudconnector/crds/{crd}") == (REPO / "crds" / crd).read_bytes()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = whl.read(entry_points).decode()
    for command in ("cloud-connector", "cloud-connector-operator", "cloud-connector-proxy"):
        assert f"{command} = cloudconnector.entry:" in scripts


def test_base_install_names_the_missing_extra(user: Venv) -> None:
    assert user.run("cloud-connector", "--help").returncode == 0
    assert user.run("cloud-connector-operator", "--help").returncode == 0
    for command, extra in (("cloud-connector-operator", "operator"), ("cloud-connector-proxy", "proxy")):
        done = user.run(command)
        assert done.returncode == 2
        hint = rf"pip install 'cloud-connector\[{extra}\]'"
        line = rf"{command}: needs the {extra} extra \(\w+ is not installed\): {hint}"
        assert re.fullmatch(line, done.stderr.strip()), done.stderr
    # `run` serves the proxy, so it names that extra too.
    done = user.run("cloud-connector", "run", "-f", str(user.home), "--once")
    assert done.returncode == 2 and "pip install 'cloud-connector[proxy]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_proxy_extra_starts_the_proxy_and_nothing_else(user: Venv, kube: Kube, bao: Bao) -> None:
    user.install("proxy")
    assert not user.packages() & NOT_IN_PROXY
    assert user.run("cloud-connector-proxy", "--help").returncode == 0
    ns = kube.namespace("cc-wheel")
    token = _reader_token(kube, ns)
    kubeconfig = kube.kubeconfig_for_token(token, user.home / "kubeconfig", ns)
    http = free_port()
    proxy = user.start(
        "cloud-connector-proxy",
        "--namespace",
        ns,
        env={
            "KUBECONFIG": str(kubeconfig),
            "VAULT_ADDR": bao.url,
            "VAULT_TOKEN": bao.token,
            "CC_PROXY_BIND": "127.0.0.1",
            "CC_PROXY_MQTT_PORT": str(free_port()),
            "CC_PROXY_TLS_PORT": "off",
            "CC_PROXY_HTTP_BIND": "127.0.0.1",
            "CC_PROXY_HTTP_PORT": str(http),
            "CC_PROXY_DRAIN_SECONDS": "0.1",
        },
    )
    try:
        wait_for(
            lambda: proxy.poll() is not None or _status(f"http://127.0.0.1:{http}/readyz") == 200, 30, "proxy"
        )
        assert proxy.poll() is None, proxy.communicate()[1][-2000:]
    finally:
        code, err = _stop(proxy)
    assert code == 0, err[-2000:]
    assert token not in err and bao.token not in err


def _reader_token(kube: Kube, ns: str) -> str:
    """A ServiceAccount with the proxy's rights in ``ns`` (list and watch the three kinds)."""
    kube.request(
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "proxy"}},
    )
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "proxy", "namespace": ns},
            "rules": [
                {
                    "apiGroups": ["cloudconnector.io"],
                    "resources": ["devices", "groups", "endpoints"],
                    "verbs": ["list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "proxy", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "proxy"},
            "subjects": [{"kind": "ServiceAccount", "name": "proxy", "namespace": ns}],
        },
    )
    return kube.service_account_token(ns, "proxy")


def test_run_provisions_the_demo_fleet_on_moto(user: Venv, moto_server: Moto) -> None:
    moto_server.reset()
    site, state = user.home / "site", user.home / "state"
    write_manifests(site, moto_server.url, DemoCA().cert_pem, 3)
    # Without [aws] the AWS Endpoint cannot be served; the run says which extra, and nothing is made.
    user.install("proxy")
    no_aws = ("--once", "--timeout", "5", "--state", str(user.home / "no-aws"))
    done = user.run("cloud-connector", "run", "-f", str(site), *no_aws)
    assert done.returncode == 1
    assert "AwsIotCore endpoints needs the aws extra" in done.stderr
    assert "pip install 'cloud-connector[aws]'" in done.stderr
    user.install("proxy,aws")
    done = user.run("cloud-connector", "run", "-f", str(site), "--once", "--state", str(state))
    assert done.returncode == 0, done.stderr[-2000:]
    table = user.run("cloud-connector", "status", "--state", str(state))
    assert table.returncode == 0
    rows = [line for line in table.stdout.splitlines() if line.startswith("sensor-")]
    assert len(rows) == 3 and all(" Ready " in row for row in rows), table.stdout
    # Watch mode: the same state, the proxy serving plain MQTT, stopped by SIGTERM.
    mqtt, http = free_port(), free_port()
    serving = user.start(
        "cloud-connector",
        "run",
        "-f",
        str(site),
        "--state",
        str(state),
        "--bind",
        "127.0.0.1",
        "--mqtt-port",
        str(mqtt),
        "--http-port",
        str(http),
    )
    try:
        wait_for(
            lambda: serving.poll() is not None or port_open("127.0.0.1", mqtt), 30, "cloud-connector run"
        )
        assert serving.poll() is None, serving.communicate()[1][-2000:]
    finally:
        code, err = _stop(serving)
    assert code == 0, err[-2000:]
    assert "PRIVATE KEY" not in done.stdout + done.stderr + err


def test_operator_extra_alone_imports_the_operator(wheel: Path, tmp_path: Path) -> None:
    venv = _venv(wheel, tmp_path)
    venv.install("operator")
    assert not venv.packages() & NOT_IN_OPERATOR
    done = venv.run("python", "-c", "import cloudconnector.operator.main, cloudconnector.clouds.aws")
    assert done.returncode == 0, done.stderr[-2000:]
    assert venv.run("cloud-connector-operator", "--help").returncode == 0
