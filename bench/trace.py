"""Where a request's time goes in a proxy, from a system-wide trace of its system calls.

    python3 bench/trace.py NAME TRACE.txt SS.txt PROXY_PORT UPSTREAM_PORT

TRACE.txt is `perf script -F comm,pid,tid,cpu,time,event,trace` of `perf record -a` with the
enter and exit tracepoints of recvfrom, writev, sendto and epoll_wait; SS.txt is `ss -tnpH`
taken while the same connections were open. Each request is followed from the proxy's read of
it to its answer's write: a caller's request goes upstream on the next upstream write after it
was read (requests leave in the order they were read), and its answer is the next one read on
that upstream connection. Every thread of the proxy is followed on its own (credgate's workers,
nginx's processes). Prints the median and 90th percentile of each step, in microseconds.
"""

import re
import statistics
import sys
from collections import defaultdict, deque

STEPS = [
    ("woke", "read", "wake-up to the request's read"),
    ("read", "sent", "request read to upstream write"),
    ("sent", "answered", "upstream write to the upstream's answer"),
    ("answered", "rewoke", "the answer to the proxy's wake-up"),
    ("rewoke", "got", "wake-up to the answer's read"),
    ("got", "done", "answer read to the caller's write"),
    ("read", "done", "in the proxy: request read to answer written"),
]

EVENT = re.compile(
    r"\s*(.+?)\s+(\d+)/(\d+)\s+\[\d+\]\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(.*)"
)


def sockets(path):
    """(pid, fd) -> (local port, peer port) of every established TCP connection."""
    socks = {}
    for line in open(path):
        f = line.split()
        if len(f) < 6:
            continue
        local, peer = int(f[3].rsplit(":", 1)[1]), int(f[4].rsplit(":", 1)[1])
        for m in re.finditer(r"pid=(\d+),fd=(\d+)", line):
            socks[(int(m.group(1)), int(m.group(2)))] = (local, peer)
    return socks


def main(name, trace, ss, proxy_port, up_port):
    socks = sockets(ss)
    proxy = {pid for (pid, _), (local, _) in socks.items() if local == proxy_port}
    by_ports = {ports: key for key, ports in socks.items()}
    # A proxy's upstream connection -> the upstream's end of it.
    peer_end = {
        key: by_ports.get((up_port, local))
        for key, (local, peer) in socks.items()
        if key[0] in proxy and peer == up_port
    }
    upstream_end = {v: k for k, v in peer_end.items() if v}

    last_fd, woke = {}, {}
    read = defaultdict(deque)  # per proxy thread: requests read, not yet sent upstream
    on_upstream = {}  # the proxy's upstream (pid, fd) -> the request in flight on it
    steps = {s: [] for s in STEPS}
    for line in open(trace):
        m = EVENT.match(line)
        if not m:
            continue
        _, pid, tid, t, kind, call, args = m.groups()
        pid, t = int(pid), float(t) * 1e6
        if kind == "enter":
            fd = re.search(r"fd: (0x[0-9a-f]+)", args)
            last_fd[tid] = int(fd.group(1), 16) if fd else None
            if call in ("writev", "sendto") and pid in proxy:
                ports = socks.get((pid, last_fd[tid]))
                if ports and ports[1] == up_port and read[tid]:
                    req = read[tid].popleft()
                    req["sent"] = t
                    on_upstream[(pid, last_fd[tid])] = req
                elif ports and ports[0] == proxy_port:
                    for key, req in list(on_upstream.items()):
                        if req["caller"] == (pid, last_fd[tid]) and "got" in req:
                            req["done"] = t
                            del on_upstream[key]
                            for a, b, label in STEPS:
                                if a in req and b in req:
                                    steps[(a, b, label)].append(req[b] - req[a])
                            break
            continue
        key = (pid, last_fd.get(tid))
        ok = not args.startswith("0xffff")  # a negative return is an error
        if pid in proxy and call == "epoll_wait":
            woke[tid] = t
        elif pid in proxy and call == "recvfrom" and ok and args != "0x0":
            ports = socks.get(key)
            if ports and ports[0] == proxy_port:
                read[tid].append({"caller": key, "woke": woke.get(tid), "read": t})
            elif key in on_upstream:
                on_upstream[key].update(got=t, rewoke=woke.get(tid))
        elif call in ("writev", "sendto") and key in upstream_end:
            req = on_upstream.get(upstream_end[key])
            if req is not None and "answered" not in req:
                req["answered"] = t

    print(f"{name}: requests followed {len(steps[STEPS[-1]])}")
    for step, values in steps.items():
        if values:
            values.sort()
            p90 = values[int(len(values) * 0.9)]
            print(f"  {step[2]:<46}{statistics.median(values):>7.0f}{p90:>7.0f}")


if __name__ == "__main__":
    n, trace, ss, port, up = sys.argv[1:6]
    main(n, trace, ss, int(port), int(up))
