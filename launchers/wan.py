"""Run a torchrun job across emulated WAN links: one network namespace per worker (run as root).

    python launchers/wan.py --workers 4 --rate 100mbit [--delay-ms 50] -- configs/noloco.yaml steps=300
    python launchers/wan.py --workers 2 --rate 100mbit --delay-ms 50 --probe   # measure the links only
    python launchers/wan.py --workers 2 --inner-size 2 --rate 100mbit --delay-ms 50 -- configs/diloco.yaml \
        comm.inner_size=2 parallel.inner=fsdp                                   # 2 sites x 2 processes

Topology: worker i lives in namespace ``<tag>w<i>`` with one veth (``eth0``, 10.213.i.2/24) whose
other end (``h<i>``, 10.213.i.1) sits in a hub namespace ``<tag>h`` that routes between workers.
Nothing is created in the caller's namespace and no address outside these namespaces is used.

Bandwidth: ``tc tbf`` on both ends of every veth, so each worker has ``--rate`` up and ``--rate``
down. Latency: this kernel has no netem, so the hub routes every worker-to-worker packet through a
TUN device served by a small user-space process (``--delay-daemon``) that holds each packet for
``--delay-ms`` before handing it back to the kernel: a real one-way delay on every packet (RTT
+2x), seen by the kernel's TCP exactly as a long link would be. Its cost is CPU in the hub (MTU 9000
keeps the packet rate low) and a little jitter when the machine is loaded; ``--probe`` measures the
RTT and throughput that the workers actually get.

One torchrun per namespace (``--nnodes N --node-rank i``, static rendezvous whose store worker 0
hosts at 10.213.0.2, reached through the hub); gloo is pinned to ``eth0``. ``--inner-size K`` starts K
processes in each namespace (ranks i*K .. i*K+K-1, which is how ``comm.inner_size=K`` groups a
worker): they reach each other at their own namespace's address, which the kernel routes over
loopback, unshaped, so a worker's inner traffic is fast and only its outer traffic crosses the link.
Everything created is removed on exit, also on failure or Ctrl-C. The job's arguments go to ``--entry`` (default
``-m dtrain.cli train``).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MTU = 9000
TUN = "dtun"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


def worker_ip(i: int) -> str:
    return f"10.213.{i}.2"


class Wan:
    """The namespaces, links, shaping and delay process; ``close()`` removes all of it."""

    def __init__(self, workers: int, *, rate: str, delay_ms: float, tag: str) -> None:
        if not 1 <= workers <= 250:
            raise ValueError(f"--workers must be in [1, 250], got {workers}")
        self.workers, self.rate, self.delay_ms = workers, rate, delay_ms
        self.hub = f"{tag}h"
        self.spaces = [f"{tag}w{i}" for i in range(workers)]
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        for ns in [self.hub, *self.spaces]:
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", self.hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        burst = "256kb"  # >= one 9000-byte packet and a few ms of tokens at 100 Mbit/s
        for i, ns in enumerate(self.spaces):
            h = f"h{i}"
            sh("ip", "-n", self.hub, "link", "add", h, "mtu", str(MTU), "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.hub, "addr", "add", f"10.213.{i}.1/24", "dev", h)
            sh("ip", "-n", self.hub, "link", "set", h, "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "mtu", str(MTU), "up")
            sh("ip", "-n", ns, "addr", "add", f"{worker_ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.213.{i}.1")
            if self.rate:
                for space, dev in ((ns, "eth0"), (self.hub, h)):
                    sh("ip", "netns", "exec", space, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                       "rate", self.rate, "burst", burst, "latency", "400ms")
        if self.delay_ms > 0:
            self._delay()

    def _delay(self) -> None:
        # Packets arriving from a worker (iif h<i>) are routed into the TUN device; the daemon writes
        # them back after the delay, and packets coming out of the TUN follow the main table to h<j>.
        sh("ip", "-n", self.hub, "tuntap", "add", "dev", TUN, "mode", "tun")
        sh("ip", "-n", self.hub, "link", "set", TUN, "mtu", str(MTU), "up")
        for key in ("all", "default", TUN):
            sh("ip", "netns", "exec", self.hub, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
        sh("ip", "-n", self.hub, "route", "add", "default", "dev", TUN, "table", "100")
        for i in range(self.workers):
            sh("ip", "-n", self.hub, "rule", "add", "iif", f"h{i}", "lookup", "100", "pref", str(100 + i))
        daemon = subprocess.Popen(["ip", "netns", "exec", self.hub, sys.executable, str(Path(__file__).resolve()),
                                   "--delay-daemon", "--delay-ms", str(self.delay_ms)], start_new_session=True)
        self.procs.append(daemon)
        time.sleep(0.3)
        if daemon.poll() is not None:
            raise RuntimeError("the delay daemon exited at start")

    def spawn(self, i: int, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        full = ["ip", "netns", "exec", self.spaces[i], "env", *[f"{k}={v}" for k, v in env.items()], *cmd]
        proc = subprocess.Popen(full, cwd=REPO, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)  # takes its veths, qdiscs and the TUN with it
        self.created = []


def delay_daemon(delay_s: float) -> None:
    """Hold every packet read from the TUN device for ``delay_s``, then write it back (FIFO)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", TUN.encode(), 0x0001 | 0x1000))  # TUNSETIFF, IFF_TUN|IFF_NO_PI
    os.set_blocking(fd, False)
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        wait = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        ready, _, _ = select.select([fd], [], [], wait)
        if ready:
            now = time.monotonic()
            while True:
                try:
                    queue.append((now + delay_s, os.read(fd, 65536)))
                except BlockingIOError:
                    break
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            try:
                os.write(fd, queue.popleft()[1])
            except OSError:
                pass  # the kernel refused one packet (e.g. no route while tearing down): a loss, like a WAN


PROBE = r"""
import socket, sys, time
role, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, 29499)); s.listen(1)
    c, _ = s.accept(); got = 0
    while got < n:
        got += len(c.recv(1 << 20))
    c.sendall(b"k"); c.close()
else:
    for _ in range(50):
        try:
            t0 = time.perf_counter(); c = socket.create_connection((host, 29499)); rtt = time.perf_counter() - t0; break
        except OSError:
            time.sleep(0.1)
    t0 = time.perf_counter(); c.sendall(b"x" * n); c.recv(1); dt = time.perf_counter() - t0
    print(f"rtt_ms={rtt * 1e3:.1f} mbit_s={n * 8 / dt / 1e6:.1f}")
"""


def probe(wan: Wan, nbytes: int = 12_500_000) -> str:
    """TCP connect time (one RTT) and bulk throughput from worker 1 to worker 0."""
    server = subprocess.Popen(["ip", "netns", "exec", wan.spaces[0], sys.executable, "-c", PROBE, "server", worker_ip(0), str(nbytes)])
    wan.procs.append(server)
    time.sleep(0.5)
    out = sh("ip", "netns", "exec", wan.spaces[1], sys.executable, "-c", PROBE, "client", worker_ip(0), str(nbytes))
    server.wait(timeout=60)
    return out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="network namespaces (sites)")
    parser.add_argument("--inner-size", type=int, default=1, help="processes per namespace (a hierarchical worker's "
                        "comm.inner_size)")
    parser.add_argument("--rate", default="100mbit", help="tc rate per link and direction; '' for unshaped")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way latency added between any two workers")
    parser.add_argument("--entry", default="-m dtrain.cli train", help="what torchrun runs (script or -m module)")
    parser.add_argument("--port", type=int, default=29400)
    parser.add_argument("--tag", default=f"dtw{os.getpid() % 100000}", help="namespace name prefix")
    parser.add_argument("--probe", action="store_true", help="measure RTT and throughput between two workers and exit")
    parser.add_argument("--delay-daemon", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("job", nargs=argparse.REMAINDER, help="-- then the job's arguments (config and key=value)")
    args = parser.parse_args()
    if args.delay_daemon:
        delay_daemon(args.delay_ms / 1e3)
        return 0
    if os.geteuid() != 0:
        print("wan.py: error: network namespaces need root; run as root (or in a container with CAP_NET_ADMIN)", file=sys.stderr)
        return 2
    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if args.inner_size < 1:
        print(f"wan.py: error: --inner-size must be >= 1, got {args.inner_size}", file=sys.stderr)
        return 2
    asked = [a.split("=", 1)[1] for a in job if a.startswith("comm.inner_size=")]
    if asked and asked[-1] != str(args.inner_size):
        print(f"wan.py: error: the job sets comm.inner_size={asked[-1]} but --inner-size {args.inner_size} puts "
              f"{args.inner_size} processes in each namespace; make them equal", file=sys.stderr)
        return 2
    wan = Wan(args.workers, rate=args.rate, delay_ms=args.delay_ms, tag=args.tag)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        wan.up()
        if args.probe:
            print(probe(wan), flush=True)
            return 0
        env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", ""),
               "HOME": os.environ.get("HOME", "/root")}
        procs = [
            wan.spawn(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.workers), "--node-rank", str(i),
                          "--nproc-per-node", str(args.inner_size), "--rdzv-backend", "static", "--master-addr", worker_ip(0),
                          "--master-port", str(args.port), *args.entry.split(), *job], env)
            for i in range(args.workers)
        ]
        codes = [p.wait() for p in procs]
        return max(codes, key=abs)
    except KeyboardInterrupt:
        return 130
    finally:
        wan.close()


if __name__ == "__main__":
    sys.exit(main())
