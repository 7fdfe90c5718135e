"""The kernel backend against a real kernel, in a VM.

This machine's kernel has no WireGuard module, so the test boots Debian's kernel
(`linux-image-amd64` ships wireguard.ko) under qemu with virtme-ng, with this
machine's root file system shared read-only, and runs inside it, as root (the
module loads on first use, as on a host):

- the backend contract (tests/test_backend_contract.py) against KernelBackend, and
  the real-kernel tunnels of tests/test_kernel_backend.py;
- end-to-end meshes of real agents with kernel WireGuard on hosts a and c beside
  wireguard-go on b (the `mixed` case of tests/meshnet.py's `mesh` fixture).

One VM for all of it: booting costs about 35 s. There is no usable KVM here, so
qemu emulates the CPU (TCG): correct, and slow. Over 9p every file access costs a
round trip, so the Python installation, the venv and the checkout go into an ext4
image on a virtio disk, mounted over their own paths inside the VM.

The inner pytest writes a JUnit report into a shared directory; this test fails
with the inner failures, and also when an inner test was skipped: inside the VM
everything selected must run. Without qemu, virtme-ng or a kernel with
wireguard.ko the test is skipped with the reason (scripts/install-system-packages.sh
and the `test` extra install them).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent

# What runs inside the VM. Everything selected must pass there, none may skip.
INNER_TESTS = (
    "tests/test_backend_contract.py::test_backend_contract[kernel]",
    "tests/test_kernel_backend.py::test_availability_check_answers_without_raising",
    "tests/test_kernel_backend.py::test_kernel_tunnel_in_place_changes",
    "tests/test_kernel_backend.py::test_kernel_many_peers_round_trip",
    "tests/test_kernel_backend.py::test_kernel_answers_to_what_goes_wrong",
    "tests/test_e2e_kernel.py::test_kernel_hosts_beside_wireguard_go[mixed]",
)
# NETMESH_VM_TESTS (node ids, space-separated) runs others instead, by hand.
SELECTED = tuple(os.environ.get("NETMESH_VM_TESTS", "").split()) or INNER_TESTS
# Waits and command timeouts of the namespace helpers, stretched for emulation.
INNER_TIME_SCALE = 5
VM_TIMEOUT = int(os.environ.get("NETMESH_VM_TIMEOUT", "900"))  # seconds, boot to power-off
IMAGE_LABEL = "netmesh-vm"


@dataclass(frozen=True)
class Kernel:
    image: Path  # /boot/vmlinuz-<release>
    release: str


def _find_kernel() -> Kernel | None:
    """The newest /boot/vmlinuz-* whose modules include wireguard."""
    for image in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        release = image.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / release / "kernel/drivers/net/wireguard"
        if any(modules.glob("wireguard.ko*")) and os.access(image, os.R_OK):
            return Kernel(image, release)
    return None


def _vng() -> str | None:
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.exists() else shutil.which("vng")


def _unavailable() -> str | None:
    """Why the VM cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (the tests inside make network namespaces)"
    missing = [tool for tool in ("qemu-system-x86_64", "mke2fs", "busybox") if not _which(tool)]
    if missing:
        return f"missing {', '.join(missing)} (scripts/install-system-packages.sh installs them)"
    if _vng() is None:
        return "missing vng (virtme-ng, in the `test` extra)"
    if _find_kernel() is None:
        return "no /boot/vmlinuz-* with wireguard.ko (Debian's linux-image-amd64 has one)"
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


# --- the fast file system ---------------------------------------------------------


def _shared_trees() -> list[Path]:
    """Directories the inner run reads a lot from, parents first: the Python
    installation (all of it, unless it is the system's), the venv, the checkout."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    base = Path(sys.base_prefix)
    trees = {ROOT, Path(sys.prefix), stdlib if str(base) in ("/", "/usr", "/usr/local") else base}
    return sorted(trees, key=lambda path: len(path.parts))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same file system: no copying
    except OSError:
        shutil.copy2(src, dst)


def _build_image(work: Path) -> tuple[Path, list[Path]]:
    """An ext4 image holding each shared tree under its index; returns the image and
    the trees. A tree nested in another is left out of its parent (an empty
    mount point instead); so are the stdlib's site-packages and test suite, and
    caches. Files are hard links where possible, then copied once by mke2fs."""
    trees = _shared_trees()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    left_out = {stdlib / "site-packages", stdlib / "test"}
    left_out |= {ROOT / name for name in (".git", ".venv", "build", "data", "bench/results")}
    caches = {".mypy_cache", ".ruff_cache", ".pytest_cache"}  # __pycache__ stays: it saves time
    stage = work / "stage"
    for index, tree in enumerate(trees):
        nested = {other for other in trees if other != tree and other.is_relative_to(tree)}
        empty = {path for path in nested | left_out if path.is_relative_to(tree)}

        def ignore(directory: str, names: list[str], empty: set[Path] = empty) -> set[str]:
            here = Path(directory)
            return {name for name in names if name in caches or here / name in empty}

        copy = stage / str(index)
        shutil.copytree(tree, copy, symlinks=True, ignore=ignore, copy_function=_link_or_copy)
        for path in empty:
            if path.is_dir():  # a mount point, or a directory shown empty
                (copy / path.relative_to(tree)).mkdir(parents=True, exist_ok=True)
    files = sum(len(dirs) + len(names) for _, dirs, names in os.walk(stage))
    size = sum(
        (Path(top) / name).lstat().st_size for top, _, names in os.walk(stage) for name in names
    )
    image = work / "fast.ext4"
    mib = size * 13 // 10 // 2**20 + 64
    subprocess.run(
        [
            _which("mke2fs") or "mke2fs",
            *("-q", "-t", "ext4", "-O", "^has_journal", "-m", "0"),
            *("-N", str(files + 4096), "-L", IMAGE_LABEL, "-d", str(stage)),
            str(image),
            f"{mib}M",
        ],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(stage)
    return image, trees


def _inner_script(out: Path, trees: list[Path]) -> str:
    """The shell script the VM runs as root."""
    q = shlex.quote
    binds = "\n".join(
        f"mount --bind /run/netmesh-fast/{index} {q(str(tree))}" for index, tree in enumerate(trees)
    )
    pytest_argv = [
        sys.executable,
        # The checkout is read-only in there: no cache, and no hypothesis database
        # (whose plugin warns, an error here, that it cannot write one).
        *("-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-ra", "-v"),
        *("-o", "timeout=600", f"--junitxml={out / 'junit.xml'}"),
        *SELECTED,
    ]
    return f"""#!/bin/sh
# Inside the VM (virtme-ng), as root; written by tests/test_kernel_vm.py.
exec >{q(str(out / "inner.log"))} 2>&1
set -eux
uname -r
# Not wireguard: the first lookup of its netlink family loads it, as on a host.
modprobe -a ext4 tun
mkdir -p /run/netmesh-fast
for _ in $(seq 50); do disk=$(blkid -L {IMAGE_LABEL}) && break; sleep 0.2; done
mount -o ro "$disk" /run/netmesh-fast
{binds}
cd {q(str(ROOT))}
export NETMESH_TEST_TIME_SCALE={INNER_TIME_SCALE}
set +e
{shlex.join(pytest_argv)} > {q(str(out / "pytest.log"))} 2>&1
echo $? > {q(str(out / "exit"))}
"""


# --- the inner results --------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str  # "passed", "failure", "error", "skipped"
    message: str
    seconds: float


def _outcomes(junit: Path) -> Iterator[Outcome]:
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        seconds = float(case.get("time") or 0)
        verdicts = [child for child in case if child.tag in ("failure", "error", "skipped")]
        if not verdicts:
            yield Outcome(name, "passed", "", seconds)
        for child in verdicts:
            text = (child.get("message") or "") + "\n" + (child.text or "")
            yield Outcome(name, child.tag, text.strip(), seconds)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path.name}: none)"


# --- the test -----------------------------------------------------------------------


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_kernel_backend_in_a_vm(tmp_path: Path) -> None:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    kernel = _find_kernel()
    vng = _vng()
    assert kernel is not None and vng is not None
    # The inner processes import what the host compiled: compile it now, once.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *(str(ROOT / d) for d in _PACKAGES)],
        check=True,
    )
    started = time.monotonic()
    image, trees = _build_image(tmp_path)
    imaged = time.monotonic() - started
    out = tmp_path / "out"
    out.mkdir()
    script = out / "inner.sh"
    script.write_text(_inner_script(out, trees))
    argv = [
        vng,
        *("--run", str(kernel.image), "--force-9p", "--disable-kvm"),
        *("--cpus", "2", "--memory", "2G"),
        *("--rwdir", str(out), "--disk", str(image)),
        *("--exec", f"sh {shlex.quote(str(script))}"),
    ]
    # vng runs virtme-run and friends from PATH.
    env = {**os.environ, "PATH": f"{Path(vng).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        with (tmp_path / "vng.log").open("wb") as log:
            vm = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=VM_TIMEOUT,
                check=False,
            )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the VM did not finish within {VM_TIMEOUT}s\n"
            f"inner pytest:\n{_tail(out / 'pytest.log')}\nvng:\n{_tail(tmp_path / 'vng.log')}"
        )
    finally:
        with contextlib.suppress(OSError):
            image.unlink()  # hundreds of MB
    elapsed = time.monotonic() - started
    junit = out / "junit.xml"
    context = (
        f"vng exited {vm.returncode}; inner log:\n{_tail(out / 'inner.log', 1500)}\n"
        f"inner pytest:\n{_tail(out / 'pytest.log')}\nvng:\n{_tail(tmp_path / 'vng.log', 1500)}"
    )
    assert junit.exists(), f"no inner test report\n{context}"
    outcomes = list(_outcomes(junit))
    passed = [o for o in outcomes if o.kind == "passed"]
    bad = [o for o in outcomes if o.kind != "passed"]
    timings = ", ".join(f"{o.name.rpartition('::')[2]} {o.seconds:.0f}s" for o in outcomes)
    print(
        f"kernel {kernel.release} VM: {elapsed:.0f}s in all (image {imaged:.0f}s); "
        f"{len(passed)} passed inside: {timings}"
    )
    summary = "\n\n".join(f"{o.kind.upper()} {o.name}\n{o.message[:2000]}" for o in bad)
    assert not bad, f"inside the VM:\n{summary}\n\ninner pytest tail:\n{_tail(out / 'pytest.log')}"
    assert len(passed) >= len(SELECTED), f"fewer tests ran than selected\n{context}"
    assert (out / "exit").read_text().strip() == "0", context


_PACKAGES = ("agent", "cli", "controlplane", "events", "projections", "tests")
