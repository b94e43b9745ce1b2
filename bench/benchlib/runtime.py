"""The deploybus command the benches run: installed as on a server (a venv of
its own with ``pip install .``), or another one given with ``--exe``."""

from __future__ import annotations

from .common import BENCH, PACKAGE_DIRS, REPO_ROOT, run


def compile_project() -> None:
    """Byte-compile the project's own modules, as installing a package does
    (dpkg, pip): with PYTHONDONTWRITEBYTECODE set, as it is on some machines,
    an editable checkout would otherwise be compiled from source by every
    process the bench starts, and every CLI start would pay for it."""
    import compileall
    for d in PACKAGE_DIRS:
        compileall.compile_dir(str(REPO_ROOT / d), quiet=1)


#: ``--exe``: another deploybus command to bench (a wrapper that profiles it, say).
EXE_OVERRIDE: list[str] = []


#: A venv with deploybus installed as a server has it (``pip install .``: the
#: runtime dependencies only, no editable-install import hook, byte-compiled).
RUNTIME_VENV = BENCH / ".venv-agent"


def runtime_deploybus() -> list[str]:
    """``deploybus`` from RUNTIME_VENV; installed, or updated when any project
    source file is newer than the install. The project's own ``.venv`` is an
    editable install with the test tools: its import hook costs every process
    about 18 ms at start, and some test tools are picked up at import
    (structlog loads greenlet, which Playwright brings)."""
    exe = RUNTIME_VENV / "bin" / "deploybus"
    stamp = RUNTIME_VENV / ".installed"
    sources = [p for d in PACKAGE_DIRS for p in (REPO_ROOT / d).rglob("*.py")] + \
        [REPO_ROOT / "setup.cfg"]
    newest = max(p.stat().st_mtime for p in sources)
    if not exe.exists() or not stamp.exists() or stamp.stat().st_mtime < newest:
        print(f"  installing deploybus into {RUNTIME_VENV} (runtime dependencies only)...",
              flush=True)
        pip = str(RUNTIME_VENV / "bin" / "pip")
        if not exe.exists():
            run(["python3", "-m", "venv", str(RUNTIME_VENV)])
            run([pip, "install", "-q", str(REPO_ROOT)])
        else:  # the dependencies are there: only the project's own code changed
            run([pip, "install", "-q", "--force-reinstall", "--no-deps", str(REPO_ROOT)])
        stamp.touch()
    return [str(exe)]


def deploybus_exe() -> list[str]:
    """The deploybus command to bench: ``--exe`` if given, else :func:`runtime_deploybus`."""
    if EXE_OVERRIDE:
        return list(EXE_OVERRIDE)
    return runtime_deploybus()
