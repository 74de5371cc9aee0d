"""Every program the test suite runs, and whether `tools/test.sh` installs it.

A fresh CI machine has Debian's required packages, apt, and what
`tools/test.sh` installs (its package list and their dependencies): a test
that runs anything else passes only on a developer's machine that happens to
have it.  So the suite records what it runs (`install()` wraps
`subprocess.Popen`, from the top-level conftest.py), looks through wrappers
(`ip netns exec`, `nsenter`, `unshare`, `setpriv`, `env`, `sh -c SCRIPT`,
pasta's own `-- COMMAND` ...) to the programs they start, adds the program
names written literally in the tests' sources, and
`integration/test_programs_installed.py` checks the lot against the packages,
last in the run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_SH = ROOT / "tools" / "test.sh"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# program -> the first command line seen running it (for the report)
SEEN: dict[str, str] = {}

# options that take the next word as their value, per wrapper
_VALUE_OPTS = {
    "nsenter": {"-t", "--target", "-S", "--setuid", "-G", "--setgid"},
    "unshare": {"-S", "--setuid", "-G", "--setgid", "-R", "--root", "-w", "--wd",
                "--propagation", "--map-user", "--map-group", "--map-users", "--map-groups",
                "--setgroups"},
    "setpriv": {"--reuid", "--regid", "--ruid", "--rgid", "--euid", "--egid", "--groups",
                "--inh-caps", "--ambient-caps", "--bounding-set", "--securebits",
                "--selinux-label", "--apparmor-profile"},
    "prlimit": {"-p", "--pid"},
    "timeout": {"-s", "--signal", "-k", "--kill-after"},
    "env": {"-u", "--unset", "-C", "--chdir"},
    "setsid": set(), "nohup": set(), "stdbuf": set(), "chroot": set(),
}
_SHELLS = {"sh", "bash", "dash"}
_KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "{", "}",
             "!", "time"}
_BUILTINS = {   # dash's: a simple command starting with one runs no program
    "cd", "echo", "exit", "set", "export", "read", "test", "[", "true", "false", "printf",
    "trap", "wait", "kill", "shift", "return", "local", "umask", "ulimit", ".", "eval",
    "unset", "alias", "type", "hash", "getopts", "times", "pwd", "readonly", ":", "case",
    "esac", "in", "break", "continue",
}
_REDIRECTS = {">", ">>", "<", "<<", ">&", "<&", "&>", ">|", "<>"}
_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _after_options(name: str, rest: Sequence[str]) -> list[str]:
    """The command a wrapper runs: after `--`, else after its options."""
    rest = list(rest)
    values = _VALUE_OPTS.get(name, set())
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            return rest[i + 1:]
        if name == "env" and _ASSIGNMENT.match(word):
            i += 1
            continue
        if not word.startswith("-") or word == "-":
            break
        i += 2 if word in values else 1
    if name == "timeout" and i < len(rest):
        i += 1                                    # the duration
    return rest[i:]


def programs_of(argv: Sequence[str]) -> list[str]:
    """The programs one command line starts: argv[0] and, through wrappers, the
    programs it runs in turn."""
    out: list[str] = []
    argv = [str(a) for a in argv]
    while argv:
        prog = argv[0]
        if prog.startswith("$") or not prog:
            break
        out.append(prog)
        name = os.path.basename(prog)
        if name == "ip" and argv[1:3] == ["netns", "exec"]:
            argv = argv[4:]
        elif name in _VALUE_OPTS:
            argv = _after_options(name, argv[1:])
        elif name in ("pasta", "passt") or name.endswith(("/pasta", "/passt")):
            argv = argv[argv.index("--") + 1:] if "--" in argv else []
        elif name in _SHELLS and "-c" in argv[1:]:
            i = argv.index("-c")
            if i + 1 < len(argv):
                out += shell_programs(argv[i + 1])
            break
        else:
            break
    return out


def shell_programs(script: str) -> list[str]:
    """The programs a `sh -c` script runs (best effort: dynamic names are skipped)."""
    lexer = shlex.shlex(script.replace("\n", " ; "), posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:                 # unbalanced quotes: not ours to judge
        return []
    out: list[str] = []
    command: list[str] = []
    for tok in [*tokens, ";"]:
        if tok in _SEPARATORS:
            out += _simple_command(command)
            command = []
        else:
            command.append(tok)
    return out


def _simple_command(words: list[str]) -> list[str]:
    i = 0
    kept: list[str] = []
    while i < len(words):            # drop redirections (and their fd numbers)
        w = words[i]
        if w in _REDIRECTS:
            i += 2
            continue
        if w.isdigit() and i + 1 < len(words) and words[i + 1] in _REDIRECTS:
            i += 1
            continue
        kept.append(w)
        i += 1
    while kept and (kept[0] in _KEYWORDS or _ASSIGNMENT.match(kept[0])):
        kept = kept[1:]
    if not kept or kept[0] in _BUILTINS or kept[0] == "for":
        return []
    if kept[0] in ("exec", "command"):
        rest = kept[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
        kept = rest
    return programs_of(kept) if kept else []


def record(args: object) -> None:
    if isinstance(args, (str, bytes, os.PathLike)):
        text = os.fsdecode(args)
        argv = ["sh", "-c", text]     # shell=True, or a bare program name
        if " " not in text:
            argv = [text]
    else:
        try:
            argv = [os.fsdecode(a) for a in args]   # type: ignore[union-attr]
        except TypeError:
            return
    for prog in programs_of(argv):
        SEEN.setdefault(prog, " ".join(argv)[:200])


def install() -> None:
    """Record every Popen of this process from now on."""
    popen_init = subprocess.Popen.__init__
    if getattr(popen_init, "_records_programs", False):
        return

    def init(self, args, *a, **kw):
        try:
            record(args)
        except Exception:  # recording must never break a test
            pass
        popen_init(self, args, *a, **kw)

    init._records_programs = True  # type: ignore[attr-defined]
    subprocess.Popen.__init__ = init  # type: ignore[method-assign]


# ------------------------------------------------------------------ the sources

_LITERAL_CALL = re.compile(
    r"\b(?:run|cmd|start|Popen|check_output|check_call|as_user|in_netns)\(\s*\[?\s*"
    r"[\"']([a-z0-9][a-z0-9_.+-]*)[\"']")


def literal_programs(paths: Iterable[Path]) -> dict[str, str]:
    """Program names written as the first word of a command in test sources."""
    found: dict[str, str] = {}
    for path in paths:
        text = path.read_text()
        for m in _LITERAL_CALL.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.setdefault(m.group(1), f"{path.relative_to(ROOT)}:{line}")
    return found


# ------------------------------------------------------------------ packages

def test_sh_packages(text: str | None = None) -> set[str]:
    """The Debian packages tools/test.sh installs (its PKGS="...")."""
    text = TEST_SH.read_text() if text is None else text
    m = re.search(r'^PKGS="([^"]*)"', text, re.M)
    if not m:
        raise ValueError("tools/test.sh has no PKGS=\"...\" list")
    return set(m.group(1).split())


def _dep_names(field: str) -> list[list[str]]:
    """'a (>= 1) | b, c:any' -> [['a', 'b'], ['c']]"""
    out = []
    for group in filter(None, (g.strip() for g in field.split(","))):
        alts = [re.sub(r"\s*\(.*?\)|\s*\[.*?\]|:\w+$", "", a.strip()).strip()
                for a in group.split("|")]
        out.append([a for a in alts if a])
    return out


def available_packages(wanted: set[str]) -> set[str]:
    """What a fresh machine has after tools/test.sh: Debian's required packages and
    apt (test.sh itself runs apt-get), the packages it installs, and all their
    dependencies (as apt resolves them: the first installed alternative)."""
    fmt = "${Package}\\t${Essential}\\t${Priority}\\t${Provides}\\t${Pre-Depends}, ${Depends}\\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True,
                         check=True).stdout
    deps: dict[str, list[list[str]]] = {}
    provides: dict[str, str] = {}
    base = {"apt"}
    for line in out.splitlines():
        name, essential, priority, prov, dep = line.split("\t")
        deps[name] = _dep_names(dep)
        for virtual, *_ in _dep_names(prov):
            provides.setdefault(virtual, name)
        if essential == "yes" or priority == "required":
            base.add(name)
    have: set[str] = set()
    todo = list(base | wanted)
    while todo:
        name = todo.pop()
        name = name if name in deps else provides.get(name, name)
        if name in have or name not in deps:
            continue
        have.add(name)
        for alts in deps[name]:
            pick = next((a for a in alts if a in deps or a in provides), None)
            if pick is not None:
                todo.append(pick)
    return have


def _aliases(path: str) -> list[str]:
    """A path and its other spelling on a merged-/usr system."""
    out = [path]
    if path.startswith("/usr/"):
        out.append(path[4:])
    elif path.startswith(("/bin/", "/sbin/", "/lib/")):
        out.append("/usr" + path)
    return out


def packages_of(paths: Iterable[str]) -> dict[str, str]:
    """path -> the package that ships it (as given, or as its real path)."""
    queries: dict[str, list[str]] = {}
    for path in paths:
        for p in {*_aliases(path), *_aliases(os.path.realpath(path))}:
            queries.setdefault(p, []).append(path)
    r = subprocess.run(["dpkg-query", "-S", *queries], capture_output=True, text=True)
    found: dict[str, str] = {}
    for line in r.stdout.splitlines():
        pkgs, _, p = line.partition(": ")
        if p in queries and not pkgs.startswith("diversion by"):
            for path in queries[p]:
                found.setdefault(path, pkgs.split(",")[0].strip().split(":")[0])
    return found


def ours(path: str) -> bool:
    """Made by tools/install.sh (the venv: pasta, passt, python), shipped in this
    repository, or made by a test in a temporary directory."""
    real = os.path.realpath(path)
    prefix = os.environ.get("PASST_PY_PREFIX", "/opt/passt-py")
    roots = [os.path.realpath(prefix), os.path.realpath(sys.prefix), str(ROOT),
             "/tmp", "/var/tmp"]
    return (real == os.path.realpath(sys.executable)
            or any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)
            or os.path.realpath(shutil.which(path) or path).startswith(tuple(roots)))


def missing(programs: dict[str, str], wanted: set[str]) -> list[str]:
    """One line per program that a fresh machine after tools/test.sh would lack."""
    problems = []
    resolved: dict[str, str] = {}
    for prog, where in sorted(programs.items()):
        if "/" in prog and not os.path.exists(prog):
            continue                  # a path nothing could install: run to see it fail
        path = prog if "/" in prog else shutil.which(prog, path=PATH)
        if path is None:
            problems.append(f"{prog}: not found on this machine (run by: {where})")
        elif not ours(path):
            resolved[path] = prog
    owners = packages_of(resolved)
    have = available_packages(wanted)
    for path, prog in sorted(resolved.items(), key=lambda kv: kv[1]):
        pkg = owners.get(path)
        if pkg is None:
            problems.append(f"{prog}: {path} belongs to no Debian package "
                            f"(run by: {programs[prog]})")
        elif pkg not in have:
            problems.append(f"{prog}: {path} comes from {pkg}, which tools/test.sh does "
                            f"not install (run by: {programs[prog]})")
    return problems
