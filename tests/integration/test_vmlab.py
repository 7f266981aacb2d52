"""The VM lab: two qemu guests on the Debian kernel, where IPVS and ESP exist.

One lab is booted for the whole module (a boot costs ~4-10 s under TCG). The tests run in
file order and the last one tears the lab down and checks that nothing is left. They skip
only when qemu or the kernel package cannot be installed (no package registry) or without
root; any other failure is a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import vm_lab_name

from swarmnet.lab import vm
from swarmnet.lab import vm_initramfs as build

VIP = "198.51.100.100"
H1, H2 = "198.51.100.11", "198.51.100.12"
KEY_AB = "0x" + "11" * 20  # AES-128 key + 4-byte salt: rfc4106 takes 20 bytes
KEY_BA = "0x" + "22" * 20


@pytest.fixture(scope="module")
def lab() -> Iterator[dict]:
    name = vm_lab_name()
    try:
        yield vm.up(name, 2)
    finally:
        vm.down(name)


def sh(lab: dict, host: str, script: str, timeout_s: float = 120.0) -> str:
    rc, out, err = vm.exec_on(lab["name"], host, ["sh", "-c", script], timeout_s)
    assert rc == 0, f"{host}: rc={rc}\n--- script\n{script}\n--- out\n{out}\n--- err\n{err}"
    return out


# ---------------------------------------------------------------- no VM needed


def test_module_closure_adds_dependencies_once() -> None:
    dep = (
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/fs/overlayfs/overlay.ko:\n"
    )
    lines = build.module_closure(dep, ("9p", "9pnet-virtio"))
    names = [line.split(":")[0].rsplit("/", 1)[1] for line in lines]
    assert sorted(names) == ["9p.ko", "9pnet.ko", "9pnet_virtio.ko", "netfs.ko", "virtio.ko"]
    with pytest.raises(build.BuildError):
        build.module_closure(dep, ("ip_vs",))


def test_cpio_is_newc_with_trailer() -> None:
    a = build._Cpio()
    a.dir("bin")
    a.file("bin/x", b"abc", 0o755)
    a.symlink("bin/y", "x")
    data = a.bytes()
    assert data.startswith(b"070701") and b"TRAILER!!!\0" in data
    assert len(data) % 4 == 0
    # the file entry: mode 0100755, size 3, then the data after the 4-aligned name
    i = data.index(b"bin/x\0")
    hdr = data[i - 110 : i]
    assert int(hdr[14:22], 16) == 0o100755 and int(hdr[54:62], 16) == 3


def test_is_static_elf() -> None:
    assert not build.is_static_elf(Path(sys.executable).resolve())  # has a dynamic loader
    assert not build.is_static_elf(Path(__file__))  # not an ELF


# ---------------------------------------------------------------- in the VMs


@pytest.mark.vm
def test_guest_runs_the_debian_kernel(lab: dict) -> None:
    out = sh(lab, "h1", "uname -r")
    assert out.strip() == lab["kver"]
    assert out.strip().endswith("-amd64") and out.strip() != os.uname().release
    assert all(h["boot_s"] is not None and h["pid"] for h in lab["hosts"])
    print("boot seconds:", [h["boot_s"] for h in lab["hosts"]])


@pytest.mark.vm
def test_exec_reports_rc_stdout_stderr_and_timeout(lab: dict) -> None:
    rc, out, err = vm.exec_on(lab["name"], "h2", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (rc, out, err) == (7, "out\n", "err\n")
    rc, out, _ = vm.exec_on(lab["name"], "h2", ["cat"], 30, input="via stdin")
    assert (rc, out) == (0, "via stdin")
    rc, _, err = vm.exec_on(lab["name"], "h2", ["sleep", "30"], timeout_s=1)
    assert rc == 124 and "timeout" in err
    rc, _, _ = vm.exec_on(lab["name"], "h2", ["/nonexistent/binary"], 30)
    assert rc == 127


@pytest.mark.vm
def test_ping_between_vms_over_the_underlay(lab: dict) -> None:
    out = sh(lab, "h1", f"ping -c 3 -W 5 {H2}")
    assert " 0% packet loss" in out
    sh(lab, "h2", f"ping -c 1 -W 5 {H1}")


@pytest.mark.vm
def test_ipvs_service_via_pyroute2_forwards_to_nat_backends(lab: dict) -> None:
    """RESULTS.md's IPVS check: VIP on h1 in front of two http.server backends, each in its own
    netns inside h1; the service is programmed with pyroute2 (fwd_method=0 = NAT); a client on
    h2 reaches both backends in turn across the underlay."""
    setup = "modprobe -a ip_vs ip_vs_rr nf_conntrack veth && sysctl -qw net.ipv4.ip_forward=1\n"
    for i, net in ((1, 128), (2, 132)):  # /30 per backend: .129/.130 and .133/.134
        setup += f"""
ip netns add be{i}
ip link add vb{i} type veth peer name eth0 netns be{i}
ip addr add 198.51.100.{net + 1}/30 dev vb{i} && ip link set vb{i} up
ip -n be{i} link set lo up && ip -n be{i} link set eth0 up
ip -n be{i} addr add 198.51.100.{net + 2}/30 dev eth0
ip -n be{i} route add default via 198.51.100.{net + 1}
mkdir -p /srv/be{i} && echo be{i} > /srv/be{i}/index.html
ip netns exec be{i} setsid python3 -m http.server 8000 --bind 198.51.100.{net + 2} \
    --directory /srv/be{i} >/tmp/be{i}.log 2>&1 &
"""
    setup += f"ip addr add {VIP}/32 dev eth0\n"
    sh(lab, "h1", setup)
    program = f"""
import socket
from pyroute2 import IPVS, IPVSDest, IPVSService
ipvs = IPVS()
svc = IPVSService(protocol=socket.IPPROTO_TCP, addr="{VIP}", port=80, sched_name="rr")
ipvs.service("add", service=svc)
for be in ("198.51.100.130", "198.51.100.134"):
    ipvs.dest("add", service=svc, dest=IPVSDest(addr=be, port=8000, fwd_method=0))
for s in ipvs.service("dump"):
    found = IPVSService.from_message(s)
    print("svc", found.get("addr"), found.get("port"), found.get("sched_name"))
    for d in ipvs.dest("dump", found):
        print("dest", d.get_nested("IPVS_CMD_ATTR_DEST", "IPVS_DEST_ATTR_ADDR"),
              d.get_nested("IPVS_CMD_ATTR_DEST", "IPVS_DEST_ATTR_FWD_METHOD"))
"""
    # sys.executable: the venv running this test, visible in the guest through the 9p root.
    rc, out, err = vm.exec_on(lab["name"], "h1", [sys.executable, "-"], 180, input=program)
    assert rc == 0, err
    assert f"svc {VIP} 80 rr" in out
    assert "dest 198.51.100.130 0" in out and "dest 198.51.100.134 0" in out
    # Wait (bounded) for both backends to listen, then go through the VIP from the other VM.
    sh(lab, "h1", "for t in $(seq 300); do "
       "curl -sf -o /dev/null --max-time 1 http://198.51.100.130:8000/ && "
       "curl -sf -o /dev/null --max-time 1 http://198.51.100.134:8000/ && exit 0; "
       "sleep 0.2; done; exit 1")  # fmt: skip
    out = sh(lab, "h2", f"for i in 1 2 3 4; do curl -s --max-time 5 http://{VIP}/; done")
    assert sorted(out.split()) == ["be1", "be1", "be2", "be2"], out
    assert sh(lab, "h1", "grep -c Masq /proc/net/ip_vs").strip() == "2"  # no ipvsadm here


@pytest.fixture
def esp(lab: dict) -> Iterator[None]:
    try:
        yield
    finally:
        for host in ("h1", "h2"):
            vm.exec_on(lab["name"], host, ["sh", "-c", "ip xfrm policy flush; ip xfrm state flush"])


def _sa(src: str, dst: str, spi: int, key: str) -> str:
    return (
        f"ip xfrm state add src {src} dst {dst} proto esp spi {spi:#x} reqid 42 mode transport "
        f"replay-window 32 aead 'rfc4106(gcm(aes))' {key} 128"
    )


def _policies(me: str, peer: str, spi: int) -> str:
    return (
        f"ip xfrm policy add src {me} dst {peer} proto icmp dir out "
        f"tmpl src {me} dst {peer} proto esp spi {spi:#x} reqid 42 mode transport && "
        f"ip xfrm policy add src {peer} dst {me} proto icmp dir in "
        f"tmpl src {peer} dst {me} proto esp reqid 42 mode transport"
    )


@pytest.mark.vm
def test_esp_rfc4106_between_vms_shows_only_esp_on_the_wire(lab: dict, esp: None) -> None:
    """ESP transport SAs with rfc4106(gcm(aes)) (the kernel loads the crypto templates on
    demand), ICMP between the VMs through them; a capture on h1's tap sees ESP only (on the bridge
    device itself, frames forwarded between two ports are not seen once MACs are learnt)."""
    sh(lab, "h1", "modprobe -a esp4 xfrm_user && "
       f"{_sa(H1, H2, 0x100, KEY_AB)} && {_sa(H2, H1, 0x200, KEY_BA)} && {_policies(H1, H2, 0x100)}")  # fmt: skip
    sh(lab, "h2", "modprobe -a esp4 xfrm_user && "
       f"{_sa(H1, H2, 0x100, KEY_AB)} && {_sa(H2, H1, 0x200, KEY_BA)} && {_policies(H2, H1, 0x200)}")  # fmt: skip
    assert "rfc4106(gcm(aes))" in sh(lab, "h1", "ip xfrm state")
    pcap = Path(f"/tmp/{lab['name']}-esp.pcap")
    cap = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab['underlay']['netns']}", "--", "tcpdump", "-nni",
         "tap1", "--immediate-mode", "-U", "-w", str(pcap), f"host {H1} and host {H2}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert cap.stderr is not None
        assert "listening on" in cap.stderr.readline()  # capture attached before the ping
        out = sh(lab, "h1", f"ping -c 5 -i 0.2 -W 5 {H2}")
        assert " 0% packet loss" in out
    finally:
        cap.send_signal(signal.SIGINT)
        cap_err = cap.communicate(timeout=10)[1]
    try:
        dump = subprocess.run(["tcpdump", "-nnr", str(pcap)], capture_output=True, text=True)
    finally:
        pcap.unlink(missing_ok=True)
    lines = dump.stdout.splitlines()
    assert len(lines) >= 10, (cap_err, dump)  # 5 requests and 5 replies at least
    assert all("ESP(spi=" in line for line in lines), dump.stdout
    stats = sh(lab, "h1", "ip -s xfrm state")
    assert "spi 0x00000100" in stats and "spi 0x00000200" in stats


@pytest.mark.vm
def test_down_removes_everything_even_without_state(lab: dict) -> None:
    """Last test: down after a simulated crash (lab.json and pidfiles gone) still finds the
    qemus by their command line and removes netns and work dir."""
    name = lab["name"]
    pids = [h["pid"] for h in vm.status(name)["hosts"]]
    assert all(pids) and sorted(vm.lab_qemus(name)) == sorted(pids)
    (vm.lab_dir(name) / "lab.json").unlink()
    for h in lab["hosts"]:
        (vm.host_dir(name, h["host"]) / "qemu.pid").unlink()
    t0 = time.monotonic()
    vm.down(name)
    print(f"down took {time.monotonic() - t0:.2f} s")
    assert vm.lab_qemus(name) == []
    assert not any(vm._alive(p) for p in pids)
    assert not (vm.NETNS_DIR / vm.lab_netns(name)).exists()
    assert not vm.lab_dir(name).exists()
    vm.down(name)  # idempotent
