"""Copy the Python runtime out of a Debian image into a bare root filesystem.

Run by images/Containerfile with the base's own python3: `python3 runtime_rootfs.py /rootfs`.
The result is what the role images start `FROM scratch` with: the interpreter, its standard
library (less what no service imports: tests, IDLE, tkinter, curses, readline, databases,
distutils, ensurepip), the shared libraries these link against (as `ldd` names them, with
their symlinks), the CA store (its bundle made from the package's certificates), the files
glibc reads (passwd, group, nsswitch.conf), the Debian copyright of every package a file
came from, and an empty world-writable /tmp. No shell, no package manager, no perl: a
process that gets into the container has nothing to run but Python.

Wheels installed later link more than Python does: all of glibc comes along (numpy's
OpenBLAS links libpthread and libdl), and EXTRA_LIBRARIES (torch and scikit-learn need the
C++ runtime). The images' tests import every package to check that nothing is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

EXTRA_LIBRARIES = ("libstdc++.so.6", "libgcc_s.so.1")
STDLIB_LEFT_OUT = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "venv", "curses", "dbm", "sqlite3", "distutils"}
# Extension modules of lib-dynload left out with them, and with the libraries only they link
# (Berkeley DB, SQLite, ncurses, readline, Kerberos through nis): ~8 MB.
DYNLOAD_LEFT_OUT = re.compile(r"^(_crypt|_curses|_curses_panel|_dbm|_gdbm|_sqlite3|nis|readline|_test\w*|xxlimited\w*)\.")
STORES = ("/etc/ssl", "/usr/lib/ssl", "/usr/share/ca-certificates", f"/etc/python{sys.version_info.major}.{sys.version_info.minor}")
GLIBC_FILES = ("/etc/nsswitch.conf", "/etc/host.conf", "/etc/os-release", "/usr/lib/os-release")
USER = "splitfed:x:10001:10001::/nonexistent:/usr/sbin/nologin"
GROUP = "splitfed:x:10001:"


def copy_path(path: str, rootfs: Path) -> None:
    """Copy one file into rootfs at the same place, following its symlinks one by one so that
    every name on the way (libc.so.6 -> libc-2.36.so) exists there too."""
    here = Path(path)
    while True:
        here = Path(os.path.realpath(here.parent)) / here.name  # /lib/x -> /usr/lib/x
        target = rootfs / here.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if here.is_symlink():
            link = os.readlink(here)
            if not target.is_symlink():
                target.symlink_to(link)
            here = here.parent / link
        else:
            if not target.exists():
                shutil.copy2(here, target)
            return


def copy_tree(top: str, rootfs: Path, left_out: set[str] = frozenset()) -> None:
    if not os.path.exists(top):
        return
    shutil.copytree(top, rootfs / top.lstrip("/"), symlinks=True, dirs_exist_ok=True, ignore=lambda folder, names: [n for n in names if n in left_out] if folder == top else [])


def linked_libraries(elf_files: list[str]) -> set[str]:
    """Every library the dynamic linker loads for these files, by the path `ldd` resolves."""
    found: set[str] = set()
    for elf in elf_files:
        out = subprocess.run(["ldd", elf], capture_output=True, text=True).stdout
        found.update(re.findall(r"(/\S+) \(0x", out))
    return found


def glibc_libraries() -> list[str]:
    listing = subprocess.run(["dpkg-query", "-L", "libc6"], capture_output=True, text=True, check=True).stdout.split()
    return [path for path in listing if re.search(r"/lib[^/]*\.so[.\d]*$", path) and os.path.isfile(path)]


def library_path(soname: str) -> str:
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    match = re.search(rf"^\s*{re.escape(soname)} \(libc6[^)]*\) => (\S+)$", listing, re.MULTILINE)
    if not match:
        sys.exit(f"runtime_rootfs: {soname} is not installed in the base image")
    return match.group(1)


def packages_owning(paths: list[str]) -> set[str]:
    """Debian packages that ship these paths (dpkg knows merged-/usr files by either name)."""
    owners: set[str] = set()
    for path in paths:
        real = os.path.realpath(path)
        for name in (path, real, real.removeprefix("/usr")):
            out = subprocess.run(["dpkg-query", "-S", name], capture_output=True, text=True)
            if out.returncode == 0:
                owners.update(line.split(":")[0].split(",")[0].strip() for line in out.stdout.splitlines())
                break
    return owners


def write_ca_bundle(rootfs: Path) -> None:
    """/etc/ssl/certs/ca-certificates.crt made again from the certificates the ca-certificates
    package selects (/etc/ca-certificates.conf), as update-ca-certificates makes it: builds
    behind a TLS-intercepting proxy mount the host's bundle over the base's, and that must
    not be what ships."""
    chosen = [line for line in Path("/etc/ca-certificates.conf").read_text().splitlines() if line and line[0] not in "#!"]
    bundle = "".join(Path("/usr/share/ca-certificates", name).read_text() for name in chosen)
    target = rootfs / "etc/ssl/certs/ca-certificates.crt"
    target.unlink()
    target.write_text(bundle)


def main(rootfs: Path) -> None:
    rootfs.mkdir(parents=True)
    # Merged /usr: /bin, /lib, /lib64, /sbin are symlinks into /usr, as in the base.
    for top in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{top}"):
            (rootfs / top).symlink_to(os.readlink(f"/{top}"))

    interpreter = os.path.realpath(sys.executable)
    stdlib = sysconfig.get_path("stdlib")
    dynload = sysconfig.get_path("platstdlib") + "/lib-dynload"
    extensions = sorted(str(p) for p in Path(dynload).glob("*.so") if not DYNLOAD_LEFT_OUT.match(p.name))
    extras = glibc_libraries() + [library_path(name) for name in EXTRA_LIBRARIES]
    libraries = linked_libraries([interpreter, *extensions, *extras]) | set(extras)

    for path in (interpreter, "/usr/bin/python3", *sorted(libraries)):
        copy_path(path, rootfs)
    copy_tree(stdlib, rootfs, STDLIB_LEFT_OUT | {"lib-dynload"})
    for extension in extensions:
        copy_path(extension, rootfs)
    for top in STORES:
        copy_tree(top, rootfs)
    write_ca_bundle(rootfs)
    for path in GLIBC_FILES:
        if os.path.lexists(path):
            copy_path(path, rootfs)

    for package in sorted(packages_owning([interpreter, stdlib + "/os.py", *sorted(libraries)]) | {"ca-certificates"}):
        copyright_file = f"/usr/share/doc/{package}/copyright"
        if os.path.exists(copyright_file):
            copy_path(copyright_file, rootfs)

    (rootfs / "etc/passwd").write_text(f"root:x:0:0:root:/root:/usr/sbin/nologin\n{USER}\n")
    (rootfs / "etc/group").write_text(f"root:x:0:\n{GROUP}\n")
    (rootfs / "tmp").mkdir(mode=0o1777)
    (rootfs / "tmp").chmod(0o1777)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
