"""File-system confinement for a sandboxed candidate: one allowlist, kept by Landlock and/or a mount namespace.

    from rlhf_cli.evals.confine import allowlist, landlock_abi
    allowlist(("numpy",))     # [(path, "ro" | "rw"), ...]: what a Python program may read, and /dev/null
    landlock_abi()            # 7 on Linux 6.15+, 0 where Landlock is missing or disabled

A candidate may read and execute what a Python program needs (the interpreter's prefixes and standard
library, the site-packages of the preloaded modules, the system's shared libraries, /usr/bin for a
subprocess, the time zone files, /dev/null and /dev/urandom) and read and write its own working
directory; nothing else. Two kernel mechanisms keep that list, and the sandbox uses every one it gets:

- Landlock (Linux >= 5.13): an access-control ruleset the process puts on itself after
  PR_SET_NO_NEW_PRIVS. Any other path fails with EACCES, even for a process holding
  CAP_DAC_READ_SEARCH, and the ruleset passes to every child. From ABI 6 the candidate also cannot
  signal processes outside its own domain (the evaluator, other candidates that run as the same uid).
- A private mount namespace (root, or an unprivileged user namespace): a fresh tmpfs becomes the root
  directory, holding read-only bind mounts of the allowed paths and a read-write one of the working
  directory; the old root is detached, so nothing else exists for the candidate. It is also what lets
  the `nobody` uid reach an interpreter that lives under a 0700 /root without any capability.

The functions below run in the candidate's process (rlhf_cli/evals/sandbox.py passes this file's
source to `python -I -c` ahead of its own bootstrap), so the module imports the standard library only.
Linux only; the mount namespace view needs pivot_root's syscall number, known here for x86_64 and aarch64.
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
import struct
import sys

# Landlock's syscalls have the same numbers on every architecture (the unified table from 424 on)
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000

# Landlock file-system rights (include/uapi/linux/landlock.h), by the ABI that introduced them
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # the only ones a file rule may hold

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1 << 10, 1 << 11, 1 << 12, 1 << 14, 1 << 18, 1 << 21
MNT_DETACH = 2

# What every Python program may read besides its interpreter; absent ones are skipped. /usr/bin (and
# /bin, often a link to it) is there so that a program run without the guard can still start a tool.
SYSTEM = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/local/lib", "/lib", "/lib64", "/lib32", "/usr/bin", "/bin",
          "/usr/share/zoneinfo", "/etc/localtime", "/etc/ld.so.cache", "/dev/urandom", "/dev/random")
WRITABLE_DEVICES = ("/dev/null", "/dev/zero")


def allowlist(preload: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(path, "ro" | "rw") for every path a candidate may touch, its working directory aside.

    "ro": read and execute; the interpreter's prefixes (whole: conda keeps shared libraries in
    prefix/lib; a system Python's prefix is /usr), its sysconfig directories (the venv's
    site-packages among them), the directories holding the `preload` modules, and SYSTEM. "rw":
    the writable devices. Paths are absolute, sorted, and none lies inside another.
    """
    import importlib.util
    import sysconfig

    ro = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sysconfig.get_paths().values(), *SYSTEM}
    for name in preload:
        spec = importlib.util.find_spec(name)  # finds the package without importing it
        where = list(spec.submodule_search_locations or ()) if spec else []
        if spec and spec.origin and not where:
            where = [os.path.dirname(spec.origin)]
        ro.update(os.path.dirname(os.path.abspath(w)) for w in where)  # the package's site dir, with its *.libs
    ro = {os.path.abspath(p) for p in ro if p and os.path.exists(p)} - {"/"}
    ro = {p for p in ro if not any(p.startswith(q + "/") for q in ro)}  # a path inside another adds nothing
    return [(p, "ro") for p in sorted(ro)] + [(d, "rw") for d in WRITABLE_DEVICES if os.path.exists(d)]


# --- Landlock ---------------------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(libc: ctypes.CDLL, number: int, *args: int | bytes | None) -> int:
    # syscall(2) is variadic: pass every argument as a full machine word
    words = [ctypes.c_char_p(a) if isinstance(a, bytes) or a is None else ctypes.c_long(a) for a in args]
    return int(libc.syscall(ctypes.c_long(number), *words))


def _fail(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing, disabled at boot, or not Linux."""
    if not sys.platform.startswith("linux"):
        return 0
    abi = _syscall(_libc(), LANDLOCK_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    return max(abi, 0)


def landlock_restrict(rules: list[tuple[str, str]], workdir: str, abi: int) -> None:
    """Restrict this process (and every child) to `rules` plus `workdir` (all rights).

    Handles every file-system right the ABI knows, so whatever no rule grants is denied; rights
    only newer kernels know (REFER from ABI 2, TRUNCATE from 3, IOCTL_DEV from 5) are asked for
    only where they exist. Needs PR_SET_NO_NEW_PRIVS (or CAP_SYS_ADMIN) first. Raises OSError.
    """
    libc = _libc()
    handled = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    # struct landlock_ruleset_attr {u64 handled_access_fs, handled_access_net, scoped}: older kernels take a prefix
    attr = struct.pack("QQQ", handled, 0, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    ruleset = _syscall(libc, LANDLOCK_CREATE_RULESET, attr, len(attr), 0)
    if ruleset < 0:
        raise _fail("landlock_create_ruleset")
    try:
        for path, mode in [*rules, (workdir, "rw")]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # gone since the parent listed it: nothing to allow
            try:
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                want = handled if mode == "rw" else FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
                if not is_dir:
                    want &= FILE_RIGHTS if mode == "rw" else FS_EXECUTE | FS_READ_FILE
                # struct landlock_path_beneath_attr {u64 allowed_access; s32 parent_fd} __attribute__((packed))
                if _syscall(libc, LANDLOCK_ADD_RULE, ruleset, 1, struct.pack("=Qi", want & handled, fd), 0) != 0:
                    raise _fail(f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if _syscall(libc, LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            raise _fail("landlock_restrict_self")
    finally:
        os.close(ruleset)


# --- the mount namespace ----------------------------------------------------------------------------


def map_ids(uid: int, gid: int) -> None:
    """In a fresh user namespace, map our own uid and gid to themselves (files we create need a mapped owner)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if x is None else x.encode() for x in (source, target, fstype, data)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        raise _fail(f"mount {target}")


def _remount_read_only(libc: ctypes.CDLL, target: str) -> None:
    # MS_BIND with MS_REMOUNT changes this mount only, never the file system (the host's view stays
    # writable). In a user namespace the flags a mount came with are locked: repeat them.
    f = os.statvfs(target).f_flag
    keep = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME) | (MS_RELATIME if f & os.ST_RELATIME else 0)
    _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def mount_view(rules: list[tuple[str, str]], workdir: str) -> None:
    """Make `rules` (all read-only) and `workdir` (read-write) the whole file system.

    Call right after unshare(CLONE_NEWNS) with CAP_SYS_ADMIN in the namespace. A tmpfs mounted on
    `workdir` becomes the new root: each allowed path is bind-mounted into it at its own absolute
    path (symlinks on the way, such as /lib -> usr/lib, recreated), the real working directory
    last; then pivot_root, the old root detached, the tmpfs made read-only, and the cwd set to
    `workdir` through the new mount. A failure before pivot_root is undone (the caller may go on
    without the view) and raised as OSError; one after it as RuntimeError (nothing to go back to).
    """
    if PIVOT_ROOT is None:
        raise OSError(0, f"pivot_root: syscall number unknown on {platform.machine()}")
    libc = _libc()
    wd = os.open(workdir, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)  # the tmpfs covers it: bind it back from this fd
    mounted = False
    try:
        _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount reaches the host
        _mount(libc, "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        mounted = True
        done: dict[str, bool] = {}  # path -> bound (True) or a recreated symlink (False)
        for path, _ in rules:
            _expose(libc, workdir, path, done, 0)
        os.makedirs(workdir + workdir, 0o755, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{wd}", workdir + workdir, None, MS_BIND)
        os.chdir(workdir)
        if _syscall(libc, PIVOT_ROOT, b".", b".") != 0:  # the old root ends up stacked on the new one ...
            raise _fail("pivot_root")
    except OSError:
        if mounted:
            os.chdir("/")
            libc.umount2(workdir.encode(), MNT_DETACH)  # the tmpfs and every bind under it
        raise
    finally:
        os.close(wd)
    try:
        if libc.umount2(b".", MNT_DETACH) != 0:  # ... and goes, with every mount below it
            raise _fail("umount the old root")
        os.chdir("/")
        _remount_read_only(libc, "/")
        os.chdir(workdir)
    except OSError as e:
        raise RuntimeError(f"mount namespace: {e}") from e


def _expose(libc: ctypes.CDLL, new: str, path: str, done: dict[str, bool], depth: int) -> None:
    """Bind `path` into the tree at `new` under the same name, recreating the symlinks it goes through."""
    if depth > 20:
        raise OSError(40, f"too many symlinks under {path}")
    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        here = "/" + "/".join(parts[: i + 1])
        if _inside(here, done):
            return  # a directory bound before holds it, links and all
        if os.path.islink(here):
            target = os.readlink(here)
            if here not in done:
                os.symlink(target, new + here)  # its parent is a plain directory of ours (checked above)
                done[here] = False
            rest = "/".join(parts[i + 1 :])
            return _expose(libc, new, os.path.normpath(os.path.join(os.path.dirname(here), target, rest)), done, depth + 1)
        if i < len(parts) - 1:
            os.makedirs(new + here, 0o755, exist_ok=True)
    target = new + path
    if os.path.isdir(path):
        os.makedirs(target, 0o755, exist_ok=True)
    else:
        open(target, "a").close()  # a bind mount of a file needs a file to cover
    _mount(libc, path, target, None, MS_BIND | MS_REC)
    _remount_read_only(libc, target)  # devices ("rw") too: writing to a device node ignores a read-only mount
    done[path] = True


def _inside(path: str, done: dict[str, bool]) -> bool:
    return any(bound and (path == d or path.startswith(d + "/")) for d, bound in done.items())


def set_capabilities(keep: int = 0) -> None:
    """Permitted and effective capabilities = the `keep` bits of the first 32 (e.g. 1 << 2,
    CAP_DAC_READ_SEARCH), none inheritable; 0: no capability left, in any namespace."""
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))  # _LINUX_CAPABILITY_VERSION_3, this thread
    if _libc().capset(header, ctypes.create_string_buffer(struct.pack("6I", keep, keep, 0, 0, 0, 0))) != 0:
        raise _fail("capset")
