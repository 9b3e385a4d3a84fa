"""The initramfs writer and the ldd parser, checked against Debian's own cpio."""

import stat
import subprocess


from lab.image import CpioEntry, parse_ldd, write_cpio

LDD_OUTPUT = """\
\tlinux-vdso.so.1 (0x00007f37b357a000)
\tlibndctl.so.6 => /lib/x86_64-linux-gnu/libndctl.so.6 (0x00007f37b3502000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f37b32e6000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f37b357c000)
"""  # from `ldd /usr/bin/ndctl` on Debian 12


def test_parse_ldd_keeps_files_and_skips_the_vdso():
    assert parse_ldd(LDD_OUTPUT.splitlines()) == [
        "/lib/x86_64-linux-gnu/libndctl.so.6",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ]


def test_write_cpio_is_deterministic():
    entries = [CpioEntry("bin", stat.S_IFDIR | 0o755), CpioEntry("bin/x", stat.S_IFREG | 0o755, b"abc")]
    assert write_cpio(entries) == write_cpio(list(entries))


def test_write_cpio_unpacks_with_gnu_cpio(tmp_path):
    entries = [
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("bin/hello", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        CpioEntry("etc", stat.S_IFDIR | 0o755),
        CpioEntry("etc/odd", stat.S_IFREG | 0o644, b"x" * 5),
        CpioEntry("sbin", stat.S_IFLNK | 0o777, b"bin"),
    ]
    archive = tmp_path / "a.cpio"
    archive.write_bytes(write_cpio(entries))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "-F", str(archive)], cwd=out, check=True)
    assert (out / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "bin/hello").stat().st_mode & 0o777 == 0o755
    assert (out / "etc/odd").read_bytes() == b"xxxxx"
    assert (out / "sbin").is_symlink() and (out / "sbin").readlink().as_posix() == "bin"
