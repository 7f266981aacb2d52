"""The VM lab: N qemu guests (TCG) running Debian's generic kernel on the host's userland.

Why: this build machine's kernel lacks IPVS and ESP. Each guest boots the kernel of Debian's
``linux-image-<ver>-amd64`` (extracted, never installed) and mounts the host's root read-only
over virtio-9p under a tmpfs overlay, so it runs the host's python3, the project's venv, ``ip``
and ``nft`` unchanged. The verified recipe is shared/vmlab/RESULTS.md; see docs/vmlab.md.

Layout, derived from the lab name alone so that ``down`` finds a crashed lab's leftovers:

- netns ``snvm-<LAB>``: bridge ``br0`` (underlay .1) and one tap ``tap<i>`` per guest; qemu
  runs in it. Nothing is ever created in the root namespace.
- ``/run/swarmnet/vmlab/<LAB>/``: ``lab.json`` and per host ``h<i>/`` with ``qemu.pid``,
  ``console.log``, ``qemu.log`` and ``agent.sock`` (virtio-serial: the command channel).
- every qemu's command line contains that directory: how stray qemus are found.
- build cache (kernel, vmlinux, initramfs): ``/var/cache/swarmnet-vmlab`` (env
  ``SWARMNET_VMLAB_CACHE``); a given .deb can be forced with ``SWARMNET_VMLAB_DEB``.

Host ``h<i>`` has underlay address ``<cidr base> + 10 + i`` on its ``eth0``, as in the netns lab.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from swarmnet.lab import vm_initramfs as build
from swarmnet.lab.netns import HOST_OFFSET, LabError, check_name, check_underlay, kill_and_wait

VM_ROOT = Path("/run/swarmnet/vmlab")
NETNS_DIR = Path("/run/netns")
CACHE_DIR = Path(os.environ.get("SWARMNET_VMLAB_CACHE", "/var/cache/swarmnet-vmlab"))
BRIDGE = "br0"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
APT_PACKAGES = ("qemu-system-x86", "busybox-static")
HOSTS_MAX = 16  # TCG guests on a 2-core machine: more would only measure the scheduler


class ToolsUnavailable(LabError):
    """qemu, busybox or the kernel package is missing and cannot be installed (no registry)."""


@dataclass(frozen=True)
class VmConfig:
    """What ``up`` boots. Defaults are the measured ones of RESULTS.md."""

    memory_mib: int = 256  # 128 MiB runs out with pyroute2 plus two http.server backends
    cidr: str = "198.51.100.0/24"  # TEST-NET-2, only inside the lab netns and the guests
    cpu: str = "max"  # exposes AES-NI and PCLMUL to the guest (rfc4106-gcm-aesni)
    boot_timeout_s: float = 180.0  # ~4 s per VM measured, ~10 s for three; under heavy load more

    def validate(self, hosts: int) -> None:
        if not 1 <= hosts <= HOSTS_MAX:
            raise LabError(f"hosts must be between 1 and {HOSTS_MAX}, not {hosts}")
        if not 128 <= self.memory_mib <= 4096:
            raise LabError(f"memory must be between 128 and 4096 MiB, not {self.memory_mib}")
        check_underlay(self.cidr, hosts)


# ---------------------------------------------------------------- names


def lab_netns(name: str) -> str:
    return f"snvm-{name}"


def lab_dir(name: str) -> Path:
    return VM_ROOT / name


def host_dir(name: str, host: str) -> Path:
    return lab_dir(name) / host


# ---------------------------------------------------------------- installing what is missing


def _run(argv: list[str], timeout_s: float = 600.0, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, **kw)


def _apt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``apt-get ARGS``; after a failure, once more after ``apt-get update`` (stale lists)."""
    if shutil.which("apt-get") is None:
        raise ToolsUnavailable("no apt-get on this machine: install qemu and busybox by hand")
    r = _run(["apt-get", *args], cwd=cwd)
    if r.returncode != 0:
        _run(["apt-get", "update"])
        r = _run(["apt-get", *args], cwd=cwd)
    return r


def ensure_tools() -> None:
    """Install qemu-system-x86 and busybox-static if missing (idempotent)."""
    if shutil.which(QEMU) and build.is_static_elf(BUSYBOX):
        return
    print(f"vmlab: installing {' '.join(APT_PACKAGES)} with apt-get", file=sys.stderr)
    r = _apt("install", "-y", "--no-install-recommends", *APT_PACKAGES)
    if r.returncode != 0 or not shutil.which(QEMU) or not build.is_static_elf(BUSYBOX):
        raise ToolsUnavailable(
            f"cannot install {' '.join(APT_PACKAGES)}: "
            f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or r.returncode}"
        )


def _kernel_package() -> str:
    """``linux-image-<ver>-amd64``: what Debian's ``linux-image-amd64`` currently depends on
    (the generic flavour: ``-cloud-`` lacks 9p)."""
    r = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in r.stdout.splitlines():
        if not line.strip().startswith("Depends:"):
            continue
        dep = line.strip().removeprefix("Depends:").strip()
        if dep.startswith("linux-image-") and dep.endswith("-amd64") and "cloud" not in dep:
            return dep
    raise ToolsUnavailable("apt offers no linux-image-amd64 (no package lists?)")


def ensure_kernel_deb() -> Path:
    """The kernel .deb, downloaded once into the cache (``apt-get download``: not installed)."""
    forced = os.environ.get("SWARMNET_VMLAB_DEB")
    if forced:
        return Path(forced)
    debs = CACHE_DIR / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pkg = None
    with contextlib.suppress(ToolsUnavailable, subprocess.SubprocessError, OSError):
        pkg = _kernel_package()
    have = sorted(debs.glob(f"{pkg or 'linux-image-*-amd64'}_*.deb"))
    if have:
        return have[-1]
    if pkg is None:
        raise ToolsUnavailable("cannot tell which linux-image-<ver>-amd64 to use (apt-cache)")
    print(f"vmlab: downloading {pkg} (extracted for the guests, not installed)", file=sys.stderr)
    r = _apt("download", pkg, cwd=debs)
    have = sorted(debs.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or not have:
        raise ToolsUnavailable(f"cannot download {pkg}: {r.stderr.strip()[-300:]}")
    return have[-1]


@dataclass(frozen=True)
class Artefacts:
    kver: str
    kernel: Path  # vmlinux (PVH) or, failing that, the bzImage
    initrd: Path
    modules: Path  # the extracted lib/modules, shared read-only with the guests


@contextlib.contextmanager
def _flock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_artefacts() -> Artefacts:
    """Tools, kernel and initramfs, each built once and cached (under a lock: two ``up`` at
    once build once)."""
    ensure_tools()
    with _flock(CACHE_DIR / "build.lock"):
        deb = ensure_kernel_deb()
        kdir = CACHE_DIR / ("kernel-" + deb.name.removesuffix(".deb"))
        if not (kdir / "kver").exists():
            print(f"vmlab: extracting {deb.name}", file=sys.stderr)
            try:
                build.prepare_kernel(deb, kdir, BUSYBOX)
            except (build.BuildError, OSError) as e:
                raise LabError(f"building the guest kernel failed: {e}") from e
        kver = (kdir / "kver").read_text().strip()
        initrd = kdir / f"initrd-{build.payload_hash(BUSYBOX)}.cpio"
        if not initrd.exists():
            try:
                build.build_initrd(kdir, kver, BUSYBOX, initrd)
            except (build.BuildError, OSError) as e:
                raise LabError(f"building the initramfs failed: {e}") from e
        kernel = kdir / "vmlinux"
        if not kernel.exists():
            kernel = kdir / "boot" / f"vmlinuz-{kver}"
        return Artefacts(kver, kernel, initrd, kdir / "lib/modules")


# ---------------------------------------------------------------- network and qemu


def _ip(*args: str, batch: list[str] | None = None) -> None:
    cmd = ["ip", *args] + (["-batch", "-"] if batch is not None else [])
    inp = "\n".join(batch) + "\n" if batch is not None else None
    r = subprocess.run(cmd, input=inp, capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.returncode}")


def build_network(name: str, hosts: int, cfg: VmConfig) -> None:
    """The lab netns with bridge (underlay .1) and persistent taps, made before qemu starts."""
    net = ipaddress.IPv4Network(cfg.cidr)
    ns = lab_netns(name)
    _ip("netns", "add", ns)
    cmds = [
        "link set lo up",
        f"link add {BRIDGE} type bridge",
        f"addr add {net.network_address + 1}/{net.prefixlen} dev {BRIDGE}",
        f"link set {BRIDGE} up",
    ]
    for i in range(1, hosts + 1):
        cmds += [f"tuntap add tap{i} mode tap", f"link set tap{i} master {BRIDGE} up"]
    _ip("-n", ns, batch=cmds)


def qemu_argv(name: str, i: int, art: Artefacts, cfg: VmConfig) -> list[str]:
    """The flags of RESULTS.md, run in the lab netns (nsenter) and daemonized."""
    host = f"h{i}"
    d = host_dir(name, host)
    net = ipaddress.IPv4Network(cfg.cidr)
    ip = f"{net.network_address + HOST_OFFSET + i}/{net.prefixlen}"
    append = (
        "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init mitigations=off "
        f"vmlab.name={host} vmlab.ip={ip}"
    )
    ro9p = "security_model=none,readonly=on"
    return [
        "nsenter", f"--net={NETNS_DIR / lab_netns(name)}", "--",
        QEMU, "-name", f"snvm-{name}-{host}",
        "-machine", "q35,accel=tcg", "-cpu", cfg.cpu, "-smp", "1", "-m", str(cfg.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(art.kernel), "-initrd", str(art.initrd), "-append", append,
        "-serial", f"file:{d / 'console.log'}",
        "-virtfs", f"local,path=/,mount_tag=hostroot,{ro9p},multidevs=remap",
        "-virtfs", f"local,path={art.modules},mount_tag=kmods,{ro9p}",
        "-netdev", f"tap,id=n0,ifname=tap{i},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:00:00:{i:02x}",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={d / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=vmlab.agent",
        "-daemonize", "-pidfile", str(d / "qemu.pid"),
    ]  # fmt: skip


def start_qemu(name: str, i: int, art: Artefacts, cfg: VmConfig) -> int:
    d = host_dir(name, f"h{i}")
    d.mkdir(parents=True, exist_ok=True)
    for f in ("agent.sock", "qemu.pid", "console.log"):
        with contextlib.suppress(FileNotFoundError):
            (d / f).unlink()
    with open(d / "qemu.log", "ab") as log:
        # -daemonize: returns once the VM is set up, so flag errors arrive here, in the log.
        r = subprocess.run(qemu_argv(name, i, art, cfg), stdin=subprocess.DEVNULL, stdout=log,
                           stderr=log)  # fmt: skip
    if r.returncode != 0:
        raise LabError(f"qemu for h{i} failed ({r.returncode}): {_tail(d / 'qemu.log')}")
    return int((d / "qemu.pid").read_text().strip())


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path.name})"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def lab_qemus(name: str) -> list[int]:
    """Live processes of lab ``name``: qemus with its work dir on their command line (every
    qemu of ours has it), and anything living in its netns."""
    marker = f"{lab_dir(name)}/".encode()
    inode = None
    with contextlib.suppress(OSError):
        st = os.stat(NETNS_DIR / lab_netns(name))
        inode = (st.st_dev, st.st_ino)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        argv = _cmdline(pid)
        # Only qemus by command line: `tail -f <lab dir>/h1/console.log` must survive down.
        hit = marker in argv and b"qemu-system" in argv.split(b"\0", 1)[0]
        if not hit and inode is not None:
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{pid}/ns/net")
                hit = (st.st_dev, st.st_ino) == inode
        if hit and _alive(pid):
            found.append(pid)
    return found


def _qemu_pid(name: str, host: str) -> int | None:
    """The recorded qemu pid if it is still this host's qemu (the pidfile may be stale)."""
    try:
        pid = int((host_dir(name, host) / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    sock = str(host_dir(name, host) / "agent.sock").encode()
    return pid if _alive(pid) and sock in _cmdline(pid) else None


# ---------------------------------------------------------------- agent channel


class AgentReset(LabError):
    """The virtio-serial connection broke mid-call (a booting guest's console reset)."""


def _call(name: str, host: str, req: dict, timeout_s: float) -> dict:
    """One request to the guest agent over its virtio-serial socket. One client at a time per
    VM (qemu's socket chardev accepts a single connection): a flock serialises callers."""
    d = host_dir(name, host)
    if not d.is_dir():
        raise LabError(f"vm lab {name!r} has no host {host!r}")
    req = dict(req, id=uuid.uuid4().hex)
    deadline = time.monotonic() + timeout_s + 30  # the agent enforces timeout_s itself
    with _flock(d / "agent.lock"):
        s = socket.socket(socket.AF_UNIX)
        try:
            while True:  # qemu may not have created the socket yet
                try:
                    s.connect(str(d / "agent.sock"))
                    break
                except OSError:
                    if time.monotonic() > deadline or _qemu_pid(name, host) is None:
                        raise LabError(
                            f"cannot reach the agent of {host}; end of its console:\n"
                            f"{_tail(d / 'console.log')}"
                        ) from None
                    time.sleep(0.05)
            try:
                s.sendall(json.dumps(req).encode() + b"\n")
            except OSError as e:  # qemu reset the chardev (seen while a guest boots)
                raise AgentReset(f"{host}: agent connection reset ({e})") from None
            buf = b""
            while True:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    raise LabError(f"{host}: no answer from the agent in time") from None
                except OSError as e:
                    raise AgentReset(f"{host}: agent connection reset ({e})") from None
                if not data:
                    raise LabError(f"{host}: agent connection closed (qemu gone?)")
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    with contextlib.suppress(ValueError):
                        resp = json.loads(line)
                        if resp.get("id") == req["id"]:  # else a stale reply of an aborted call
                            return resp
        finally:
            s.close()


def exec_on(
    name: str, host: str, argv: list[str], timeout_s: float = 300.0, input: str | None = None
) -> tuple[int, str, str]:
    """Run ``argv`` (no shell; use ``["sh", "-c", ...]`` for one) in guest ``host`` as root,
    PATH starting with busybox's module tools and ping. Returns (rc, stdout, stderr); rc 124
    on timeout, 128+N if killed by signal N. Background jobs must redirect their output."""
    if not argv:
        raise LabError("exec needs a command")
    resp = _call(name, host, {"argv": list(argv), "input": input, "timeout": timeout_s}, timeout_s)
    return int(resp["rc"]), resp.get("out", ""), resp.get("err", "")


def spawn(name: str, host: str, command: str, log: str, prelude: str = "") -> int:
    """Start shell ``command`` in the background in guest ``host`` and return its pid.

    It runs in a session of its own (``setsid``): the guest agent kills the process group of
    a command that times out, and a background job must outlive the call that started it.
    Its output goes to ``log`` (a guest path), stdin is /dev/null, so ``exec_on`` returns at
    once. ``prelude`` runs first, in the foreground (e.g. ``modprobe``). Stop it with
    ``exec_on(..., ["kill", "-TERM", "--", f"-{pid}"])`` (the pid is its process group)."""
    script = f"{prelude}\nsetsid sh -c {shlex.quote(command)} >{log} 2>&1 </dev/null &\necho $!"
    rc, out, err = exec_on(name, host, ["sh", "-c", script], 120)
    if rc != 0 or not out.strip().splitlines()[-1:] or not out.split()[-1].isdigit():
        raise LabError(f"{host}: could not start {command!r}: rc={rc} {out.strip()} {err.strip()}")
    return int(out.split()[-1])


def _wait_ready(name: str, host: str, t0: float, cfg: VmConfig, out: dict) -> None:
    deadline = t0 + cfg.boot_timeout_s
    while True:
        try:
            rc, _, err = exec_on(
                name, host, ["sh", "-c", "until [ -e /run/vmlab.ready ]; do sleep 0.05; done"],
                timeout_s=max(1.0, deadline - time.monotonic()),
            )  # fmt: skip
            if rc == 0:
                out[host] = time.monotonic() - t0
                return
            out[host] = LabError(f"{host}: {err.strip()}")
        except AgentReset as e:  # transient while the guest brings its console up
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            out[host] = e
        except LabError as e:
            out[host] = e
        break
    console = _tail(host_dir(name, host) / "console.log")
    out[host] = LabError(f"{out[host]}\nend of {host}'s console.log:\n{console}")


# ---------------------------------------------------------------- commands


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the vm lab needs root (network namespaces, taps)")


def write_record(name: str, record: dict) -> None:
    """Replace lab.json (e.g. swarmnet.lab.vm_swarm fills in ``api`` and ``role``)."""
    _write_record(name, record)


def _write_record(name: str, record: dict) -> None:
    path = lab_dir(name) / "lab.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def up(name: str, hosts: int, cfg: VmConfig | None = None) -> dict:
    """Boot guests h1..h<hosts> and wait until each one's agent answers and eth0 is up.
    Installs and builds what is missing first. A lab of the same name is removed first.
    On a boot failure everything is removed again (the console logs are in the message)."""
    cfg = cfg or VmConfig()
    check_name(name)
    cfg.validate(hosts)
    _require_root()
    art = ensure_artefacts()
    if lab_dir(name).exists() or (NETNS_DIR / lab_netns(name)).exists() or lab_qemus(name):
        print(f"vm lab {name!r} already exists: removing it first", file=sys.stderr)
        down(name)
    net = ipaddress.IPv4Network(cfg.cidr)
    lab_dir(name).mkdir(parents=True)
    record = {
        "name": name,
        "kind": "vm",
        "kver": art.kver,
        "cidr": cfg.cidr,
        "memory_mib": cfg.memory_mib,
        "underlay": {
            "netns": lab_netns(name),
            "bridge": BRIDGE,
            "ip": str(net.network_address + 1),
        },  # fmt: skip
        "hosts": [
            {
                "host": f"h{i}",
                # A guest, not a namespace (use exec_on): this is where its qemu and tap live.
                "netns": lab_netns(name),
                "underlay_ip": str(net.network_address + HOST_OFFSET + i),
                "api": None,  # no swarmnet agent is started (yet)
                "role": None,
                "pid": None,  # qemu's pid
                "console": str(host_dir(name, f"h{i}") / "console.log"),
                "boot_s": None,
            }
            for i in range(1, hosts + 1)
        ],
    }
    _write_record(name, record)
    try:
        build_network(name, hosts, cfg)
        # Start every qemu, then wait for all: the boots overlap.
        starts = {}
        for i, h in enumerate(record["hosts"], 1):
            starts[h["host"]] = time.monotonic()
            h["pid"] = start_qemu(name, i, art, cfg)
        _write_record(name, record)
        results: dict[str, float | LabError] = {}
        threads = [
            threading.Thread(target=_wait_ready, args=(name, h, t0, cfg, results))
            for h, t0 in starts.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [str(r) for r in results.values() if isinstance(r, LabError)]
        if errors or len(results) != hosts:
            raise LabError("VM boot failed: " + "\n".join(errors))
        for h in record["hosts"]:
            h["boot_s"] = round(results[h["host"]], 2)  # type: ignore[arg-type]
        _write_record(name, record)
    except BaseException:
        with contextlib.suppress(LabError):
            down(name)
        raise
    return record


def status(name: str) -> dict:
    """lab.json with each qemu pid checked live (null if not running)."""
    check_name(name)
    try:
        record = json.loads((lab_dir(name) / "lab.json").read_text())
    except FileNotFoundError:
        raise LabError(f"no vm lab named {name!r}") from None
    except ValueError as e:
        raise LabError(f"vm lab {name!r}: lab.json is unreadable ({e})") from e
    for h in record["hosts"]:
        h["pid"] = _qemu_pid(name, h["host"])
    return record


def down(name: str) -> None:
    """Kill the lab's qemus (SIGTERM, then SIGKILL), delete its netns (taps and bridge go with
    it) and its work dir. Works from the names alone, so also after a crash; idempotent."""
    check_name(name)
    _require_root()
    pids = lab_qemus(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_and_wait(lambda: lab_qemus(name))
    errors = []
    ns = lab_netns(name)
    if (NETNS_DIR / ns).exists():
        r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if r.returncode != 0 and (NETNS_DIR / ns).exists():
            errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
    shutil.rmtree(lab_dir(name), ignore_errors=True)
    if lab_dir(name).exists():
        errors.append(f"could not remove {lab_dir(name)}")
    if errors:
        raise LabError("vm lab down left something behind: " + "; ".join(errors))
