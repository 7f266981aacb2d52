"""iperf3 throughput over VXLAN, encrypted (ESP rfc4106, our plan) vs plain, between two VMs
of the VM lab, in the same run. Under TCG the absolute figures are low; the ratio matters.

    sudo .venv/bin/python bench/ipsec_iperf.py [--seconds 5] [--runs 3]

Prints one JSON line per run and a summary line (medians, ratio)."""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys

from swarmnet.ipsec.keys import Key, KeySet
from swarmnet.lab import vm

H1, H2 = "198.51.100.11", "198.51.100.12"
ENTRY = "from swarmnet.ipsec import lab_main; lab_main()"


def sh(lab: str, host: str, script: str) -> str:
    rc, out, err = vm.exec_on(lab, host, ["sh", "-c", script], 300)
    if rc != 0:
        raise SystemExit(f"{host}: {script}\n{out}\n{err}")
    return out


def setup(lab: str, host: str, local: str, remote: str, i: int, ks: KeySet) -> None:
    sh(lab, host, (
        "modprobe -a vxlan esp4 xfrm_user aesni_intel; "
        f"ip link add vxe type vxlan id 4096 local {local} remote {remote} dstport 4789 dev eth0"
        f" && ip link set vxe mtu 1416 up && ip addr add 10.91.0.{i}/24 dev vxe && "
        f"ip link add vxp type vxlan id 5000 local {local} remote {remote} dstport 4789 dev eth0"
        f" && ip link set vxp mtu 1416 up && ip addr add 10.92.0.{i}/24 dev vxp"
    ))  # fmt: skip
    doc = {"local": local, "peers": [remote], "vnis": [4096], "keyset": ks.to_dict()}
    rc, out, err = vm.exec_on(lab, host, [sys.executable, "-c", ENTRY, json.dumps(doc)], 300)
    if rc != 0:
        raise SystemExit(f"{host}: {out}\n{err}")


def iperf(lab: str, dst: str, seconds: int) -> float:
    out = sh(lab, "h1", f"iperf3 -c {dst} -t {seconds} -J")
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    lab = "snbench_" + secrets.token_hex(3)
    ks = KeySet(1, (Key(1, secrets.token_bytes(16), 0.0),), 1)
    try:
        vm.up(lab, 2)
        setup(lab, "h1", H1, H2, 1, ks)
        setup(lab, "h2", H2, H1, 2, ks)
        sh(lab, "h2", "iperf3 -s -D --logfile /tmp/iperf3.log")
        sh(lab, "h1", "ping -c 3 -W 5 10.91.0.2 && ping -c 3 -W 5 10.92.0.2")
        plain, enc = [], []
        for run in range(a.runs):  # interleaved: both see the same machine load
            plain.append(iperf(lab, "10.92.0.2", a.seconds))
            enc.append(iperf(lab, "10.91.0.2", a.seconds))
            print(json.dumps({"run": run, "plain_mbps": round(plain[-1], 1),
                              "esp_mbps": round(enc[-1], 1)}), flush=True)  # fmt: skip
        mp, me = statistics.median(plain), statistics.median(enc)
        print(json.dumps({"summary": True, "mtu": 1416, "plain_median_mbps": round(mp, 1),
                          "esp_median_mbps": round(me, 1), "ratio": round(me / mp, 3)}))  # fmt: skip
    finally:
        vm.down(lab)


if __name__ == "__main__":
    main()
