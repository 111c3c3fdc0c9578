"""Peak-RSS helpers shared by the benchmarks: VmHWM of a process and its descendants."""

import os


def hwm_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root: int) -> dict[int, str]:
    parent, names = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
                names[int(d)] = open(f"/proc/{d}/cmdline", "rb").read()[:60].decode(
                    errors="replace")
            except OSError:
                continue
    out, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out[c] = names.get(c, "")
                frontier.append(c)
    return out
