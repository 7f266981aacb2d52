"""Build artefacts of the VM lab: the guest kernel (from a Debian .deb) and a busybox initramfs.

Follows the verified recipe (shared/vmlab/RESULTS.md, steps 1-6):

- the kernel .deb is *extracted*, never installed: the host keeps its own kernel;
- ``busybox depmod`` writes modules.dep (the .deb has none: depmod runs in postinst, and the
  host has no kmod);
- the xz payload of the bzImage is decompressed into an ELF ``vmlinux`` that qemu boots through
  PVH: under TCG that skips SeaBIOS and in-guest decompression (7.0 s -> ~4 s per boot);
- the initramfs is an uncompressed newc cpio written here in Python (the host has no ``cpio``)
  with static busybox, the modules needed to mount the root (virtio-pci, 9p, overlay), and the
  guest payload: stage-1 ``/init``, stage-2 scripts and the command agent.

The guest scripts are text constants below so that the build cache can be keyed by their hash:
changing one rebuilds the initramfs on the next ``lab up``.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess
from pathlib import Path

# Enough to mount the host's root over virtio-9p and stack an overlay on it; their
# dependencies (virtio, netfs, fscache, ...) are added from modules.dep.
INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Applet links in the initramfs (stage 1) and in the guest's /vmlab/bin (first in PATH there).
STAGE1_APPLETS = ("sh", "mount", "umount", "mkdir", "modprobe", "insmod", "switch_root", "cat")
GUEST_APPLETS = ("init", "modprobe", "insmod", "rmmod", "lsmod", "depmod", "modinfo", "ping")

NINEP_OPTS = "trans=virtio,version=9p2000.L,cache=loose,msize=512000"

INIT = f"""#!/bin/sh
# stage 1: load virtio/9p/overlay, overlay a tmpfs on the host's root (9p, read-only), switch.
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {" ".join(INITRD_MODULES)}; do modprobe $m || echo "stage1: modprobe $m failed"; done
O={NINEP_OPTS}
mount -t 9p -o ro,$O hostroot /lower || {{ echo "stage1: 9p root mount failed"; exec sh; }}
mount -t tmpfs -o mode=755 rw /rw && mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work,index=off,metacopy=off,\
redirect_dir=off root /newroot || {{ echo "stage1: overlay failed"; exec sh; }}
mkdir -p /newroot/lib/modules /newroot/vmlab /newroot/etc
mount -t 9p -o ro,$O kmods /newroot/lib/modules || echo "stage1: module share mount failed"
cp -a /vmlab/. /newroot/vmlab/
cp /bin/busybox /newroot/vmlab/bin/busybox
cp /vmlab/inittab /newroot/etc/inittab
mount --move /dev /newroot/dev; umount /proc /sys
exec switch_root /newroot /vmlab/bin/init
"""

INITTAB = """::sysinit:/vmlab/init2
::once:/vmlab/netup
::respawn:/vmlab/agent
::shutdown:/vmlab/bin/busybox true
"""

# Parses vmlab.KEY=VALUE from the kernel command line into shell variables.
_CMDLINE_VARS = (
    "for a in $(/vmlab/bin/busybox cat /proc/cmdline); do case $a in vmlab.*=*) k=${a%%=*}; "
    "eval \"${k#vmlab.}='${a#*=}'\";; esac; done"
)

INIT2 = f"""#!/vmlab/bin/busybox sh
# stage 2 (busybox init sysinit; root = overlay): pseudo filesystems, module helper, hostname.
B=/vmlab/bin/busybox
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys
$B grep -q ' /dev devtmpfs' /proc/mounts || $B mount -t devtmpfs dev /dev
$B mkdir -p /dev/pts /dev/shm /run /tmp; $B mount -t devpts devpts /dev/pts
$B mount -t tmpfs tmpfs /dev/shm; $B mount -t tmpfs -o mode=755 tmpfs /run
# /tmp stays the overlay view of the host's /tmp (a tmpfs here would hide it); writes go to RAM.
$B mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
echo /vmlab/bin/modprobe > /proc/sys/kernel/modprobe
{_CMDLINE_VARS}
$B hostname "${{name:-vm}}"
echo "127.0.0.1 localhost ${{name:-vm}}" > /etc/hosts
/vmlab/bin/modprobe virtio_console
echo "vmlab: init2 done $(cat /proc/uptime)" > /dev/console
"""

NETUP = f"""#!/vmlab/bin/busybox sh
# runs while the agent starts; the host waits for /run/vmlab.ready before calling the lab up
{_CMDLINE_VARS}
/vmlab/bin/modprobe -a virtio_net
ip link set lo up
ip link set eth0 up && [ -n "${{ip:-}}" ] && ip addr add "$ip" dev eth0
: > /run/vmlab.ready
echo "vmlab: netup done $(cat /proc/uptime)" > /dev/console
"""

AGENT_SH = """#!/bin/sh
export PATH=/vmlab/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
exec /usr/bin/python3 -S -u /vmlab/agent.py
"""

# One JSON request per line on the virtio-serial port "vmlab.agent":
#   {"id", "argv": [...], "input": str|null, "timeout": float|null} -> {"id", "rc", "out", "err"}
# One request at a time (the host holds a lock per VM). read() gives EOF while no host client
# is connected: poll slowly then (about 2 % of a core per idle VM).
AGENT_PY = r"""
import glob, json, os, signal, subprocess, time
def port():
    while True:
        for d in glob.glob('/sys/class/virtio-ports/*'):
            try:
                if open(d + '/name').read().strip() == 'vmlab.agent':
                    return '/dev/' + os.path.basename(d)
            except OSError:
                pass
        time.sleep(0.1)
def run(req):
    argv, inp, to = req.get('argv') or ['true'], req.get('input'), req.get('timeout')
    try:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if inp is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    except OSError as e:
        return 127, b'', ('vmlab: %s: %s\n' % (argv[0], e)).encode()
    try:
        out, err = p.communicate(inp.encode() if inp is not None else None, timeout=to)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        try:  # a setsid'd grandchild may still hold the pipes: do not wait for it forever
            out, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill(); out, err = b'', b''
        return 124, out or b'', (err or b'') + b'\nvmlab: timeout\n'
    return (128 - rc if rc < 0 else rc), out, err
fd = os.open(port(), os.O_RDWR)
try:
    with open('/dev/console', 'w') as c, open('/proc/uptime') as u:
        c.write('vmlab: agent ready ' + u.read())
except OSError:
    pass
buf = b''
while True:
    data = os.read(fd, 65536)
    if not data:
        buf = b''
        time.sleep(0.05)
        continue
    buf += data
    while b'\n' in buf:
        line, buf = buf.split(b'\n', 1)
        try:
            req = json.loads(line)
        except ValueError:
            continue
        rc, out, err = run(req)
        resp = json.dumps({'id': req.get('id'), 'rc': rc, 'out': out.decode('utf-8', 'replace'),
                           'err': err.decode('utf-8', 'replace')}).encode() + b'\n'
        try:
            while resp:
                resp = resp[os.write(fd, resp):]
        except OSError:
            pass
"""

PAYLOAD = {
    "init": (INIT, 0o755),
    "vmlab/inittab": (INITTAB, 0o644),
    "vmlab/init2": (INIT2, 0o755),
    "vmlab/netup": (NETUP, 0o755),
    "vmlab/agent": (AGENT_SH, 0o755),
    "vmlab/agent.py": (AGENT_PY, 0o644),
}


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def payload_hash(busybox: Path) -> str:
    """Key of the initramfs cache: the guest scripts, the module list and busybox itself."""
    h = hashlib.sha256()
    for path, (text, mode) in sorted(PAYLOAD.items()):
        h.update(f"{path}\0{mode}\0{text}\0".encode())
    h.update(" ".join(INITRD_MODULES + STAGE1_APPLETS + GUEST_APPLETS).encode())
    h.update(busybox.read_bytes())
    return h.hexdigest()[:12]


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF64 without PT_INTERP: it runs in the initramfs, where there
    is no dynamic loader yet."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


# ---------------------------------------------------------------- kernel


def extract_vmlinux(vmlinuz: Path, out: Path) -> bool:
    """Decompress the xz payload of a bzImage into an ELF vmlinux (booted via PVH).
    False if the image is not xz-compressed or the result is not an ELF."""
    data = vmlinuz.read_bytes()
    i = data.find(b"\xfd7zXZ\x00")
    if i < 0:
        return False
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[i:])
    except lzma.LZMAError:
        return False
    if elf[:4] != b"\x7fELF":
        return False
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    return True


def prepare_kernel(deb: Path, dest: Path, busybox: Path) -> str:
    """Extract ``deb`` into ``dest`` (atomically: a crash leaves no half-built directory),
    write modules.dep, extract vmlinux. Returns the kernel version."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    r = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"dpkg-deb -x {deb} failed: {r.stderr.strip()}")
    versions = sorted(p.name for p in (tmp / "lib/modules").iterdir())
    if len(versions) != 1 or not (tmp / "boot" / f"vmlinuz-{versions[0]}").exists():
        raise BuildError(f"{deb} does not hold exactly one kernel (found {versions})")
    kver = versions[0]
    r = subprocess.run(
        [str(busybox), "depmod", "-b", str(tmp), kver], capture_output=True, text=True
    )
    if r.returncode != 0 or not (tmp / "lib/modules" / kver / "modules.dep").exists():
        raise BuildError(f"busybox depmod failed: {r.stderr.strip()}")
    # No vmlinux is not fatal: the bzImage boots too, ~3 s slower under TCG.
    extract_vmlinux(tmp / "boot" / f"vmlinuz-{kver}", tmp / "vmlinux")
    (tmp / "kver").write_text(kver + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return kver


# ---------------------------------------------------------------- initramfs


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base[: base.index(".ko")].replace("-", "_")


def module_closure(modules_dep: str, names: tuple[str, ...]) -> list[str]:
    """The modules.dep lines of ``names`` and everything they depend on, dependencies included
    once each. Names compare with ``-`` and ``_`` as equal, as modprobe does."""
    lines = {}
    for line in modules_dep.splitlines():
        if ":" in line:
            lines[_modname(line.split(":", 1)[0])] = line
    todo, seen, out = [n.replace("-", "_") for n in names], set(), []
    while todo:
        m = todo.pop(0)
        if m in seen:
            continue
        seen.add(m)
        if m not in lines:
            raise BuildError(f"module {m} is not in modules.dep")
        out.append(lines[m])
        todo += [_modname(d) for d in lines[m].split(":", 1)[1].split()]
    return out


class _Cpio:
    """A newc ("070701") archive: what the kernel unpacks into the initial rootfs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1]]
        fields += [len(name) + 1, 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.parts += [hdr, b"\0" * (-len(hdr) % 4), data, b"\0" * (-len(data) % 4)]
        self.ino += 1

    def dir(self, name: str) -> None:
        self._add(name, 0o40755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._add(name, 0o20600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return b"".join(self.parts)


def build_initrd(kdir: Path, kver: str, busybox: Path, out: Path) -> list[str]:
    """Write the initramfs to ``out``; returns the modules it carries."""
    moddir = kdir / "lib/modules" / kver
    deps = module_closure((moddir / "modules.dep").read_text(), INITRD_MODULES)
    a = _Cpio()
    dirs = {"bin", "dev", "proc", "sys", "lower", "rw", "newroot", "vmlab", "vmlab/bin"}
    dirs |= {"lib", "lib/modules", f"lib/modules/{kver}"}
    for line in deps:
        parent = f"lib/modules/{kver}/" + line.split(":", 1)[0]
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            dirs.add(parent)
    for d in sorted(dirs):
        a.dir(d)
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted: without this
    # node stage 1 would print nothing to the console log.
    a.chardev("dev/console", 5, 1)
    a.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in STAGE1_APPLETS:
        a.symlink(f"bin/{applet}", "busybox")
    for applet in GUEST_APPLETS:
        a.symlink(f"vmlab/bin/{applet}", "busybox")
    for line in deps:
        rel = line.split(":", 1)[0]
        a.file(f"lib/modules/{kver}/{rel}", (moddir / rel).read_bytes())
    a.file(f"lib/modules/{kver}/modules.dep", ("\n".join(deps) + "\n").encode())
    for path, (text, mode) in PAYLOAD.items():
        a.file(path, text.encode(), mode)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(a.bytes())
    os.replace(tmp, out)
    return [_modname(line.split(":", 1)[0]) for line in deps]
