"""The systemd unit's sandboxing must leave bwrap's bottles working.

There is no systemd to start the unit under, so the test builds its sandbox by hand: a private
mount namespace set up the way systemd sets it up for each option the unit has (read-only and
inaccessible binds, a private /dev and /tmp, a read-only root with the state directory
writable), then the service's user, capability bounding set, no-new-privileges, umask and
seccomp filters. Inside that, a real bottle (``bottles.bwrap_argv``) must write to its workspace.
An option the test does not know fails it: a new option has to be emulated here first.

Not emulated, and why:
- the device cgroup that PrivateDevices= and ProtectClock= imply: a cgroup filter, and it allows
  the pseudo-devices (null, zero, full, random, urandom, tty, pts) that are all bwrap's /dev has;
- LockPersonality=, RestrictRealtime=, RestrictSUIDSGID=: seccomp on personality(2), realtime
  scheduling and set-id modes, which bwrap never asks for;
- LoadCredential=: a credentials mount under /run/credentials, outside /proc and the bottle;
- User=/Group=: stood in for by nobody/nogroup: by setuid when the test runs as root, else by
  mapping the test's user to nobody in a user namespace that keeps the capabilities the mounts
  need until setpriv drops them.
Paths a host lacks (/usr/lib/modules, /proc/kcore, ...) are skipped, as systemd skips them.
The seccomp stand-ins use x86-64 syscall numbers, so the test runs on x86-64 only.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from bottles import bwrap_argv, find_bwrap
from tests.conftest import needs_bwrap

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "forgebottle.service"

pytestmark = [
    needs_bwrap,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp stand-ins are x86-64"),
    pytest.mark.skipif(
        not (shutil.which("unshare") and shutil.which("setpriv")), reason="needs util-linux's unshare and setpriv"
    ),
]


class Unemulated(Exception):
    """The unit sets something this test has no emulation for."""


def service_options(text: str) -> list[tuple[str, str]]:
    """(key, value) of the [Service] section, in order, repeats kept (systemd merges some)."""
    options: list[tuple[str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service":
            if line.endswith("\\"):
                raise Unemulated(f"continued line: {line!r}")
            key, _, value = line.partition("=")
            options.append((key.strip(), value.strip()))
    return options


def with_option(text: str, key: str, value: str) -> str:
    """``text`` with every ``key=`` line replaced by ``key=value`` at the end of [Service]."""
    lines = [line for line in text.splitlines() if not line.startswith(f"{key}=")]
    at = next(i for i, line in enumerate(lines) if line.strip() == "[Install]")
    return "\n".join([*lines[:at], f"{key}={value}", *lines[at:]]) + "\n"


# -- seccomp, as a classic BPF program loaded before the bottle starts ---------------------

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
NR, ARCH = 0, 4

# x86-64 numbers of the syscalls the options below refuse.
SYSCALLS = {
    "socket": 41,
    "clone": 56,
    "syslog": 103,
    "adjtimex": 159,
    "settimeofday": 164,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "clock_settime": 227,
    "unshare": 272,
    "clock_adjtime": 305,
    "setns": 308,
    "finit_module": 313,
    "clone3": 435,
}
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
NAMESPACES = {
    "mnt": 0x00020000,
    "cgroup": 0x02000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "user": 0x10000000,
    "pid": 0x20000000,
    "net": 0x40000000,
    "time": 0x00000080,
}
ALL_NAMESPACES = sum(NAMESPACES.values())
CLONE_NEWTIME = NAMESPACES["time"]  # clone(2) takes the exit signal in those bits


def arg(n: int) -> int:
    """Offset of the low word of syscall argument ``n`` in struct seccomp_data."""
    return 16 + 8 * n


def ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def ret_errno(number: int) -> int:
    return 0x00050000 | number


@dataclasses.dataclass
class Seccomp:
    native_only: bool = False
    denied: dict[int, int] = dataclasses.field(default_factory=dict)  # syscall -> return action
    families: tuple[bool, frozenset[int]] | None = None  # (allow-list?, address families)
    namespaces: int = ALL_NAMESPACES  # CLONE_NEW* flags allowed

    def deny(self, names: list[str], action: int) -> None:
        for name in names:
            if name not in SYSCALLS:
                raise Unemulated(f"no syscall number for {name!r}")
            self.denied[SYSCALLS[name]] = action

    def empty(self) -> bool:
        return not (self.native_only or self.denied or self.families) and self.namespaces == ALL_NAMESPACES

    def program(self) -> bytes:
        prog = b""
        if self.native_only:
            prog += ins(LD_ABS, ARCH) + ins(JEQ, AUDIT_ARCH_X86_64, jt=1) + ins(RET, RET_KILL_PROCESS)
            prog += ins(LD_ABS, NR) + ins(JGE, X32_SYSCALL_BIT, jf=1) + ins(RET, RET_KILL_PROCESS)
        for nr, action in self.denied.items():
            prog += ins(LD_ABS, NR) + ins(JEQ, nr, jf=1) + ins(RET, action)
        if self.families is not None:
            allow_list, families = self.families
            n = len(families)
            prog += ins(LD_ABS, NR) + ins(JEQ, SYSCALLS["socket"], jf=n + 3) + ins(LD_ABS, arg(0))
            for i, family in enumerate(sorted(families)):
                prog += ins(JEQ, family, jt=n - i)
            # Fall through to the first return when no family matched, jump to the second if one did.
            refuse, allow = ins(RET, ret_errno(errno.EAFNOSUPPORT)), ins(RET, RET_ALLOW)
            prog += refuse + allow if allow_list else allow + refuse
        forbidden = ALL_NAMESPACES & ~self.namespaces
        if forbidden:
            for name, mask in (("unshare", forbidden), ("clone", forbidden & ~CLONE_NEWTIME)):
                prog += ins(LD_ABS, NR) + ins(JEQ, SYSCALLS[name], jf=3) + ins(LD_ABS, arg(0))
                prog += ins(JSET, mask, jf=1) + ins(RET, ret_errno(errno.EPERM))
            # glibc falls back to clone(2) when clone3 is missing, as under systemd.
            prog += ins(LD_ABS, NR) + ins(JEQ, SYSCALLS["clone3"], jf=1) + ins(RET, ret_errno(errno.ENOSYS))
            prog += ins(LD_ABS, NR) + ins(JEQ, SYSCALLS["setns"], jf=4) + ins(LD_ABS, arg(1))
            prog += ins(JEQ, 0, jt=1) + ins(JSET, forbidden, jf=1) + ins(RET, ret_errno(errno.EPERM))
        return prog + ins(RET, RET_ALLOW)


# -- the outer sandbox ------------------------------------------------------------------------

# Run by the emulation's Python, already inside the private namespaces: mounts, then the
# process attributes systemd sets last, then the service user and the bottle.
HELPER = r"""
import ctypes, json, os, subprocess, sys
spec = json.loads(sys.argv[1])
subprocess.run(["/bin/sh", "-euc", spec["setup"]], check=True)
os.umask(spec["umask"])
if spec["filter"]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    prog = bytes.fromhex(spec["filter"])
    fprog = Fprog(len(prog) // 8, prog)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0):
        raise OSError(ctypes.get_errno(), "seccomp")
os.execv(spec["argv"][0], spec["argv"])
"""

# Shell functions for the mounts: systemd's read-only (recursive) and inaccessible binds. A
# remount keeps each mount's other flags: in a user namespace they are locked, and dropping
# one is refused. remount_ro's first argument: patterns of mount points to leave alone.
SHELL_PRELUDE = """
set -f
remount_ro() {
  keep=$1; shift
  while read -r m opts; do
    [ -e "$m" ] || continue  # shadowed by a later mount, e.g. under the private /tmp
    for p in $keep; do case "$m" in $p) continue 2;; esac; done
    mount -o "remount,bind,ro,${opts#r[wo],}" "$m"
  done <<EOF
$(findmnt -rn -o TARGET,VFS-OPTIONS "$@")
EOF
}
ro() {
  [ -e "$1" ] || return 0
  mountpoint -q "$1" || mount --rbind "$1" "$1"
  remount_ro "" -R --mountpoint "$1"
}
inaccessible() {
  [ -e "$1" ] || return 0
  if [ -d "$1" ]; then src="$NODES/dir"; else src="$NODES/reg"; fi
  mount --bind "$src" "$1"
  mount -o remount,bind,ro,nosuid,nodev,noexec "$1"
}
"""

PRIVATE_DEV = """
mount --rbind /dev "$NODES/olddev"
mount -t tmpfs -o mode=755,nosuid,noexec tmpfs /dev
for n in null zero full random urandom tty; do touch "/dev/$n"; mount --bind "$NODES/olddev/$n" "/dev/$n"; done
mkdir /dev/pts /dev/shm
mount --bind "$NODES/olddev/pts" /dev/pts
mount --bind "$NODES/olddev/shm" /dev/shm
ln -s pts/ptmx /dev/ptmx
"""

# systemd's ProtectKernelTunables= tables: what it makes read-only, and inaccessible.
KERNEL_TUNABLES_RO = [
    "/proc/acpi",
    "/proc/apm",
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/latency_stats",
    "/proc/mtrr",
    "/proc/scsi",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys",
]
KERNEL_TUNABLES_HIDDEN = ["/proc/kallsyms", "/proc/kcore"]

YES, NO = frozenset({"yes", "true", "on", "1"}), frozenset({"no", "false", "off", "0"})


@dataclasses.dataclass
class Emulation:
    """What the unit asks of systemd, gathered option by option, then built in systemd's order."""

    namespaces: list[str] = dataclasses.field(default_factory=lambda: ["--mount"])
    private_dev: bool = False
    private_tmp: bool = False
    read_only: list[str] = dataclasses.field(default_factory=list)
    hidden: list[str] = dataclasses.field(default_factory=list)
    proc_options: str | None = None
    strict: bool = False
    state: str | None = None
    cache: str | None = None
    user: bool = False
    no_new_privs: bool = False
    bounding: list[str] | None = None
    umask: int = 0o022
    state_mode: int = 0o755
    seccomp: Seccomp = dataclasses.field(default_factory=Seccomp)
    syscall_filter: list[str] = dataclasses.field(default_factory=list)
    syscall_errno: int | None = None
    families: list[str] = dataclasses.field(default_factory=list)

    def writable(self) -> list[str]:
        dirs = [f"/var/lib/{self.state}" if self.state else "", f"/var/cache/{self.cache}" if self.cache else ""]
        return [d for d in dirs if d]

    def setup(self) -> str:
        """Shell for the private mount namespace, as root there."""
        lines = [SHELL_PRELUDE, 'mount --bind "$NODES/lib" /var/lib', 'mount --bind "$NODES/cache" /var/cache']
        lines += [f"mount --bind {d} {d}" for d in self.writable()]
        if self.proc_options is not None:
            lines.append(f"mount -t proc -o nosuid,nodev,noexec,{self.proc_options} proc /proc")
        if self.private_dev:
            lines.append(PRIVATE_DEV)
        lines += [f"inaccessible {shlex.quote(p)}" for p in dict.fromkeys(self.hidden)]
        lines += [f"ro {shlex.quote(p)}" for p in dict.fromkeys(self.read_only)]
        if self.private_tmp:
            lines.append("mount -t tmpfs -o mode=1777 tmpfs /tmp; mount -t tmpfs -o mode=1777 tmpfs /var/tmp")
        if self.strict:
            keep = ["/proc", "/proc/*", "/sys", "/sys/*", "/dev", "/dev/*", *self.writable()]
            keep += ["/tmp", "/var/tmp"] if self.private_tmp else []
            lines.append(f"remount_ro {shlex.quote(' '.join(keep))}")
        return "\n".join(lines)

    def seccomp_filter(self) -> Seccomp:
        seccomp = dataclasses.replace(self.seccomp, denied=dict(self.seccomp.denied))
        if self.syscall_filter:
            if not all(name.startswith("~") for name in self.syscall_filter):
                raise Unemulated("SystemCallFilter= as an allow-list")
            names = [name.lstrip("~") for value in self.syscall_filter for name in value.split()]
            action = RET_KILL_PROCESS if self.syscall_errno is None else ret_errno(self.syscall_errno)
            seccomp.deny(names, action)
        if self.families:
            words = " ".join(self.families).split()
            allow_list = not words[0].startswith("~")
            words = [w.lstrip("~") for w in words]
            if not set(words) <= FAMILIES.keys():
                raise Unemulated(f"RestrictAddressFamilies={' '.join(words)}")
            seccomp.families = (allow_list, frozenset(FAMILIES[w] for w in words))
        return seccomp


def boolean(value: str) -> bool:
    if value.lower() in YES:
        return True
    if value.lower() in NO:
        return False
    raise Unemulated(f"not a boolean: {value!r}")


def when(flag: Callable[[Emulation], None]) -> Callable[[Emulation, str], None]:
    """A handler for a boolean option that does ``flag`` when set."""

    def handle(emu: Emulation, value: str) -> None:
        if boolean(value):
            flag(emu)

    return handle


def protect_system(emu: Emulation, value: str) -> None:
    if value == "strict":
        emu.strict = True
    elif value in ("yes", "true", "full"):
        emu.read_only += ["/usr", "/boot", "/efi"] + (["/etc"] if value == "full" else [])
    elif value.lower() not in NO:
        raise Unemulated(f"ProtectSystem={value}")


def protect_home(emu: Emulation, value: str) -> None:
    if value == "read-only":
        emu.read_only += ["/home", "/run/user", "/root"]
    elif boolean(value):
        emu.hidden += ["/home", "/run/user", "/root"]


def restrict_namespaces(emu: Emulation, value: str) -> None:
    if value.lower() in YES | NO:
        emu.seccomp.namespaces = 0 if boolean(value) else ALL_NAMESPACES
        return
    names = value.lstrip("~").split()
    if not set(names) <= NAMESPACES.keys():
        raise Unemulated(f"RestrictNamespaces={value}")
    mask = sum(NAMESPACES[n] for n in names)
    emu.seccomp.namespaces = ALL_NAMESPACES & ~mask if value.startswith("~") else mask


def capability_bounding_set(emu: Emulation, value: str) -> None:
    if value.startswith("~"):
        raise Unemulated("CapabilityBoundingSet=~")
    emu.bounding = [] if not value else (emu.bounding or []) + value.lower().split()


def proc(options: str) -> Callable[[Emulation, str], None]:
    def handle(emu: Emulation, value: str) -> None:
        if value in ("default", "all"):
            return
        emu.proc_options = ",".join(filter(None, [emu.proc_options, f"{options}={value}"]))

    return handle


def nothing(emu: Emulation, value: str) -> None:
    """Options with no bearing on mounts, namespaces or syscalls (or not emulated; see above)."""


def state_directory(emu: Emulation, value: str) -> None:
    emu.state = value


def cache_directory(emu: Emulation, value: str) -> None:
    emu.cache = value


def state_directory_mode(emu: Emulation, value: str) -> None:
    emu.state_mode = int(value, 8)


def umask(emu: Emulation, value: str) -> None:
    emu.umask = int(value, 8)


def syscall_filter(emu: Emulation, value: str) -> None:
    emu.syscall_filter = [*emu.syscall_filter, value] if value else []


def syscall_errno(emu: Emulation, value: str) -> None:
    emu.syscall_errno = getattr(errno, value) if value else None


def address_families(emu: Emulation, value: str) -> None:
    emu.families = [*emu.families, value] if value else []


def user(emu: Emulation, value: str) -> None:
    emu.user = True


def no_new_privs(emu: Emulation) -> None:
    emu.no_new_privs = True


def read_only_paths(emu: Emulation, value: str) -> None:
    emu.read_only += [p.lstrip("-") for p in value.split()]


def inaccessible_paths(emu: Emulation, value: str) -> None:
    emu.hidden += [p.lstrip("-") for p in value.split()]


def private_tmp(emu: Emulation) -> None:
    emu.private_tmp = True


def private_devices(emu: Emulation) -> None:
    emu.private_dev = True
    emu.seccomp.deny(["ioperm", "iopl"], ret_errno(errno.EPERM))


def protect_kernel_tunables(emu: Emulation) -> None:
    emu.read_only += KERNEL_TUNABLES_RO
    emu.hidden += KERNEL_TUNABLES_HIDDEN


def protect_kernel_logs(emu: Emulation) -> None:
    emu.hidden += ["/proc/kmsg", "/dev/kmsg"]
    emu.seccomp.deny(["syslog"], ret_errno(errno.EPERM))


def protect_kernel_modules(emu: Emulation) -> None:
    emu.hidden += ["/usr/lib/modules", "/lib/modules"]
    emu.seccomp.deny(["init_module", "finit_module", "delete_module"], ret_errno(errno.EPERM))


def protect_control_groups(emu: Emulation) -> None:
    emu.read_only.append("/sys/fs/cgroup")


def protect_clock(emu: Emulation) -> None:
    emu.seccomp.deny(["clock_settime", "clock_adjtime", "settimeofday", "adjtimex"], ret_errno(errno.EPERM))


def protect_hostname(emu: Emulation) -> None:
    # As systemd does it: a UTS namespace, hostname and domainname read-only in /proc, no sethostname.
    emu.namespaces.append("--uts")
    emu.read_only += ["/proc/sys/kernel/hostname", "/proc/sys/kernel/domainname"]
    emu.seccomp.deny(["sethostname", "setdomainname"], ret_errno(errno.EPERM))


def architectures(emu: Emulation, value: str) -> None:
    if value not in ("native", ""):
        raise Unemulated(f"SystemCallArchitectures={value}")
    emu.seccomp.native_only = value == "native"


OPTIONS: dict[str, Callable[[Emulation, str], None]] = {
    **dict.fromkeys(
        ["Type", "ExecStart", "Environment", "LoadCredential", "StateDirectoryMode", "CacheDirectoryMode"], nothing
    ),
    **dict.fromkeys(["Restart", "RestartSec", "KillMode", "TimeoutStopSec", "LimitNOFILE"], nothing),
    **dict.fromkeys(["LockPersonality", "RestrictRealtime", "RestrictSUIDSGID"], nothing),
    "User": user,
    "Group": user,
    "StateDirectory": state_directory,
    "CacheDirectory": cache_directory,
    "UMask": umask,
    "StateDirectoryMode": state_directory_mode,
    "NoNewPrivileges": when(no_new_privs),
    "CapabilityBoundingSet": capability_bounding_set,
    "ProtectSystem": protect_system,
    "ProtectHome": protect_home,
    "PrivateTmp": when(private_tmp),
    "PrivateDevices": when(private_devices),
    "ProtectKernelTunables": when(protect_kernel_tunables),
    "ProtectKernelLogs": when(protect_kernel_logs),
    "ProtectKernelModules": when(protect_kernel_modules),
    "ProtectControlGroups": when(protect_control_groups),
    "ProtectClock": when(protect_clock),
    "ProtectHostname": when(protect_hostname),
    "ProtectProc": proc("hidepid"),
    "ProcSubset": proc("subset"),
    "ReadOnlyPaths": read_only_paths,
    "InaccessiblePaths": inaccessible_paths,
    "RestrictAddressFamilies": address_families,
    "RestrictNamespaces": restrict_namespaces,
    "SystemCallFilter": syscall_filter,
    "SystemCallErrorNumber": syscall_errno,
    "SystemCallArchitectures": architectures,
}


def emulate(text: str) -> Emulation:
    emu = Emulation()
    for key, value in service_options(text):
        if key not in OPTIONS:
            raise Unemulated(f"{key}= has no emulation in tests/test_unit.py")
        OPTIONS[key](emu, value)
    return emu


BOTTLED = "test -r /proc/self/status && echo bottled > /workspace/out"


def run_bottle_under(
    unit_text: str, tmp: Path, network: Literal["none", "host"] = "none", script: str = BOTTLED
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a real bottle, /workspace writable, inside an emulation of ``unit_text``."""
    emu = emulate(unit_text)
    if emu.state is None:
        raise Unemulated("no StateDirectory=: the bottle's workspace lives there")
    root = os.geteuid() == 0
    nodes = tmp / "nodes"
    workspace = nodes / "lib" / emu.state / "bottles" / "b1" / "workspace"
    workspace.mkdir(parents=True)
    (nodes / "cache" / (emu.cache or "unused")).mkdir(parents=True)
    (nodes / "olddev").mkdir()
    (nodes / "reg").touch(mode=0)
    (nodes / "dir").mkdir(mode=0)
    for d in (nodes, nodes / "lib", nodes / "cache"):
        d.chmod(0o755)
    (nodes / "lib" / emu.state).chmod(emu.state_mode)
    if root and emu.user:
        # StateDirectory= belongs to the service's user.
        for d in (workspace, *workspace.parents):
            os.chown(d, 65534, 65534)
            if d == nodes / "lib" / emu.state:
                break
    inside = f"/var/lib/{emu.state}/bottles/b1/workspace"
    bwrap = find_bwrap()
    assert bwrap is not None
    bottle = [
        *bwrap_argv(bwrap, network=network, binds=[("--bind", inside, "/workspace")]),
        "--",
        "/bin/sh",
        "-c",
        script,
    ]
    outer = ["unshare", *emu.namespaces, "--propagation", "private"]
    drop = [shutil.which("setpriv") or "setpriv"]
    if root and emu.user:
        drop += ["--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    elif not root:
        as_user = ["--map-user=65534", "--map-group=65534"] if emu.user else ["--map-root-user"]
        outer += ["--user", "--keep-caps", *as_user]
        # Only a user namespace's own pid namespace may have a proc mounted in it.
        outer += ["--pid", "--fork"] if emu.proc_options else []
    if emu.user:
        drop += ["--inh-caps=-all", "--ambient-caps=-all"]
    if emu.no_new_privs:
        drop.append("--no-new-privs")
    if emu.bounding is not None:
        drop += ["--bounding-set=" + ",".join(["-all", *(f"+{c[4:]}" for c in emu.bounding)])]
    seccomp = emu.seccomp_filter()
    spec = {
        "setup": emu.setup(),
        "umask": emu.umask,
        "filter": "" if seccomp.empty() else seccomp.program().hex(),
        "argv": [*drop, "--", *bottle],
    }
    return subprocess.run(
        [*outer, "--", sys.executable, "-I", "-c", HELPER, json.dumps(spec)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NODES": str(nodes)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def wrote_workspace(tmp: Path, state: str) -> str:
    out = tmp / "nodes" / "lib" / state / "bottles" / "b1" / "workspace" / "out"
    return out.read_text() if out.exists() else ""


@pytest.mark.parametrize("network", ["none", "host"])
def test_a_bottle_runs_under_the_units_sandboxing(tmp_path: Path, network: Literal["none", "host"]) -> None:
    result = run_bottle_under(UNIT.read_text(), tmp_path, network)
    assert result.returncode == 0, result.stderr
    assert wrote_workspace(tmp_path, "forgebottle") == "bottled\n"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("ProtectKernelTunables", "yes", "Can't mount proc on /newroot/proc: Operation not permitted"),
        ("ProtectKernelLogs", "yes", "Can't mount proc on /newroot/proc: Operation not permitted"),
        ("ProtectHostname", "yes", "Can't mount proc on /newroot/proc: Operation not permitted"),
        ("ProcSubset", "pid", "overflowuid"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6", "NETLINK"),
        ("RestrictNamespaces", "yes", "No permissions to create new namespace"),
    ],
)
def test_an_option_that_breaks_bottles_fails_the_check(tmp_path: Path, key: str, value: str, error: str) -> None:
    result = run_bottle_under(with_option(UNIT.read_text(), key, value), tmp_path)
    assert result.returncode != 0
    assert error in result.stderr
    assert wrote_workspace(tmp_path, "forgebottle") == ""


# Each line prints something only if the agent got at what the options left out protected.
KERNEL_PROBES = r"""
exec > /workspace/out 2>/dev/null
echo '|/tmp/x' > /proc/sys/kernel/core_pattern && echo core_pattern=written
echo 1 > /proc/sys/vm/drop_caches && echo drop_caches=written
echo h > /proc/sysrq-trigger && echo sysrq=written
head -c1 /proc/kmsg > /dev/null && echo kmsg=read
dmesg > /dev/null && echo dmesg=read
grep -qv '^0* ' /proc/kallsyms && echo kallsyms=addresses
echo x > /proc/sys/kernel/hostname && echo hostname=written
echo probed
"""


def test_an_agent_gets_nothing_from_what_the_unit_leaves_out(tmp_path: Path) -> None:
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    result = run_bottle_under(UNIT.read_text(), tmp_path, script=KERNEL_PROBES)
    assert result.returncode == 0, result.stderr
    assert wrote_workspace(tmp_path, "forgebottle").split() == ["probed"]
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern


def test_an_option_the_check_does_not_know_fails_it(tmp_path: Path) -> None:
    with pytest.raises(Unemulated, match="PrivateUsers"):
        run_bottle_under(with_option(UNIT.read_text(), "PrivateUsers", "yes"), tmp_path)


def test_the_unit_leaves_room_for_idle_connections() -> None:
    values = [v for k, v in service_options(UNIT.read_text()) if k == "LimitNOFILE"]
    assert values, "LimitNOFILE= is not set: systemd's default soft limit is 1024"
    soft = values[-1].split(":")[0]
    assert soft == "infinity" or int(soft) >= 8192


def test_the_emulation_holds_what_the_unit_sets() -> None:
    emu = emulate(UNIT.read_text())
    # The options the unit relies on for its sandbox are all in force in the emulation.
    assert emu.strict and emu.private_dev and emu.private_tmp and emu.no_new_privs and emu.user
    assert emu.bounding == [] and "/sys" in emu.read_only
    assert not any(p.startswith("/proc") for p in emu.read_only + emu.hidden)
    seccomp = emu.seccomp_filter()
    assert seccomp.families == (True, frozenset({1, 2, 10, 16}))
    assert SYSCALLS["syslog"] in seccomp.denied and seccomp.native_only
