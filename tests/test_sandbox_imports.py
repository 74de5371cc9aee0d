"""Every module the sandboxed process may import is imported before the sandbox.

After `common.sandbox.enter()` the root is empty: an import that is not already
in `sys.modules` cannot find its file (and `_NoImports` refuses it by name).
This test finds every import inside a function of our code (a "lazy" import)
and fails unless its module is loaded by the time pasta or passt enter the
sandbox, or the function is one that only runs during set-up (listed below,
each with the reason).  A new lazy import therefore fails here until it is
either preloaded (`common.sandbox.PRELOAD`) or shown to be set-up only.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "pasta", "passt")

# (file, function) -> why its imports happen before the sandbox or elsewhere
SETUP_ONLY = {
    ("common/hostinfo.py", "_discover_netlink"): "runs in the netlink helper process",
    ("pasta/netcfg.py", "_apply"): "runs in the netlink helper process",
    ("common/helper.py", "_bypass_init"): "runs in the netlink helper process",
    ("common/options.py", "program_main"): "start of the program",
    ("common/process.py", "begin"): "start-up, before the session exists",
    ("pasta/cli.py", "run"): "start-up",
    ("passt/cli.py", "start_up"): "start-up",
    ("passt/cli.py", "_run"): "start-up",
    ("common/report.py", "to_syslog"): "after the sandbox the import is refused and the "
    "ImportError caught: a new /dev/log socket (AF_UNIX) is not allowed there anyway",
    ("pasta/cli.py", "start_up"): "start-up",
    ("pasta/ns.py", "_check_type"): "opening the target namespaces",
    ("pasta/session.py", "_guest_state"): "Session.setup",
    ("common/seccomp.py", "<module>"): "the __main__ block: a developer's tool",
    ("common/log.py", "detach"): "daemon start-up: syslog's handler is made before the "
    "sandbox",
    ("pasta/watch.py", "__init__"): "NetnsFileWatch is made in Session.watch_target",
}


def lazy_imports() -> list[tuple[str, str, int, str]]:
    """(file, function, line, module) for each import inside a function."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text())
            funcs = [(n, n.name) for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            funcs += [(n, "<module>") for n in tree.body if isinstance(n, ast.If)]
            for func, name in funcs:
                for node in ast.walk(func):
                    for mod in _targets(node, rel):
                        found.append((rel, name, node.lineno, mod))
    return found


def _targets(node: ast.AST, rel: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = rel.rsplit("/", node.level)[0].replace("/", ".")
            base = f"{pkg}.{base}" if base else pkg
        out = []
        for a in node.names:
            sub = f"{base}.{a.name}"
            try:
                is_module = importlib.util.find_spec(sub) is not None
            except (ImportError, ValueError):
                is_module = False
            out.append(sub if is_module else base)
        return out
    return []


LOADED = """
import json, sys
import pasta.cli, pasta.session, passt.cli, passt.session
from common import sandbox
sandbox.preload()
print(json.dumps(sorted(sys.modules)))
"""


def loaded_at_sandbox() -> set[str]:
    r = subprocess.run([sys.executable, "-c", LOADED], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, check=True)
    return set(json.loads(r.stdout))


def test_lazy_imports_are_loaded_before_the_sandbox():
    loaded = loaded_at_sandbox()
    missing = [f"{f}:{line} {fn}() imports {mod}"
               for f, fn, line, mod in lazy_imports()
               if (f, fn) not in SETUP_ONLY and mod not in loaded]
    assert not missing, "lazy imports not loaded before the sandbox (add to " \
                        "common.sandbox.PRELOAD or SETUP_ONLY):\n" + "\n".join(missing)


def test_the_known_lazy_imports_are_found():
    """The scan itself works: the lazy imports we know of today are among its findings."""
    found = {(f, mod) for f, _fn, _line, mod in lazy_imports()}
    assert ("common/packet/checksum.py", "numpy") in found
    assert ("common/udp/handler.py", "ipaddress") in found
    assert ("common/tap.py", "common.loop") in found


def test_setup_only_entries_still_exist():
    """A stale SETUP_ONLY entry would hide a renamed function's new imports."""
    present = {(f, fn) for f, fn, _line, _mod in lazy_imports()}
    assert set(SETUP_ONLY) <= present, set(SETUP_ONLY) - present


def test_imports_are_refused_after_the_sandbox_point():
    code = ("import sys\nfrom common import sandbox\n"
            "sys.meta_path.insert(0, sandbox._NoImports())\n"
            "try:\n    import xml.dom.minidom\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert "import of xml after the sandbox was entered" in r.stdout, r.stdout + r.stderr


def test_standard_library_lazy_paths_are_primed():
    """Lazy imports inside the standard library, found by the integration suite: json
    decoding bytes in UTF-16/32 (a control client's garbage) and idna."""
    code = ("import json, sys\nfrom common import sandbox\nsandbox.preload(checksums=False)\n"
            "sys.meta_path.insert(0, sandbox._NoImports())\n"
            "for text in ('{}'.encode(e) for e in ('utf-16-le', 'utf-16-be', 'utf-32-le',"
            " 'utf-32-be', 'utf-8-sig')):\n    json.loads(text)\n"
            "'example.test'.encode('idna')\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.stdout.strip() == "ok", r.stderr
