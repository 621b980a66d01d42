"""lensjax.runtime: the opt-in glibc huge-pages restart of the command-line tools."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from lensjax import runtime


@pytest.fixture
def thp(tmp_path):
    def write(text):
        p = tmp_path / "enabled"
        p.write_text(text + "\n")
        return str(p)

    return write


@pytest.fixture
def glibc_236(monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))


def test_tunable_is_added_to_the_users_own(glibc_236, thp):
    on = {"LENSJAX_HUGE_PAGES": "1"}
    env = runtime.huge_pages_env({**on, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"},
                                 thp_path=thp("always [madvise] never"))
    assert env == {**on, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "PATH": "/bin"}
    assert runtime.huge_pages_env(on, thp_path=thp("[always] madvise never"))["GLIBC_TUNABLES"] == runtime.TUNABLE


@pytest.mark.parametrize("environ,thp_text,libc", [
    ({}, "always [madvise] never", ("glibc", "2.36")),  # not asked for (the default)
    ({"LENSJAX_HUGE_PAGES": "0"}, "always [madvise] never", ("glibc", "2.36")),
    ({"LENSJAX_HUGE_PAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "always [madvise] never",
     ("glibc", "2.36")),  # the user's own setting wins
    ({"LENSJAX_HUGE_PAGES": "1"}, "always madvise [never]", ("glibc", "2.36")),  # THP off in the kernel
    ({"LENSJAX_HUGE_PAGES": "1"}, "always [madvise] never", ("glibc", "2.31")),  # glibc without the tunable
    ({"LENSJAX_HUGE_PAGES": "1"}, "always [madvise] never", ("", "")),  # musl or unknown
])
def test_no_restart_where_it_would_do_nothing_or_is_not_wanted(monkeypatch, thp, environ, thp_text, libc):
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: libc)
    assert runtime.huge_pages_env(environ, thp_path=thp(thp_text)) is None


def test_no_restart_without_the_thp_file(glibc_236, tmp_path):
    assert runtime.huge_pages_env({"LENSJAX_HUGE_PAGES": "1"}, thp_path=str(tmp_path / "missing")) is None


CHILD = textwrap.dedent(
    """
    import ctypes, os, sys
    from lensjax.runtime import reexec_with_huge_pages
    reexec_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    n = 64 << 20
    a = libc.malloc(n)  # plain malloc (numpy advises huge pages on its own arrays), an mmap'd chunk
    ctypes.memset(a, 1, n)
    with open("/proc/self/smaps_rollup") as fh:
        huge = [int(l.split()[1]) for l in fh if l.startswith("AnonHugePages:")][0]
    print(os.environ.get("GLIBC_TUNABLES", ""), "|", " ".join(sys.argv[1:]), "|", huge, "|", int(a != 0))
    """
)


def _thp_usable():
    lib, ver = platform.libc_ver()
    try:
        ok = lib == "glibc" and tuple(int(x) for x in ver.split(".")[:2]) >= (2, 35)
        return ok and "[never]" not in open(runtime.THP_PATH).read() and os.path.exists("/proc/self/smaps_rollup")
    except (OSError, ValueError):
        return False


@pytest.mark.skipif(not _thp_usable(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_restart_keeps_the_arguments_and_the_kernel_gives_huge_pages(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LENSJAX_HUGE_PAGES")}
    out = subprocess.run([sys.executable, str(script), "--x", "a b"], env=dict(env, LENSJAX_HUGE_PAGES="1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    tunables, args, huge, _ = (s.strip() for s in out.stdout.split("|"))
    assert tunables == runtime.TUNABLE and args == "--x a b"
    assert int(huge) >= 2048, out.stdout  # at least one 2 MiB page, counted by the kernel
    # without the restart, in madvise mode, the same malloc gets fewer (here: none) huge pages
    off = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and off.stdout.split("|")[0].strip() == ""
    if "[madvise]" in open(runtime.THP_PATH).read():
        assert int(off.stdout.split("|")[2]) < int(huge), (off.stdout, out.stdout)
