"""Nothing outside ``kvmufw_hook/backends/`` knows a concrete backend: callers import the
package (the registry) and the interface (``backends.base``), never a backend's module;
each backend is checked against the interface by mypy (``_IS_A_BACKEND``)."""

import ast

from conftest import ROOT

from kvmufw_hook import backends

PACKAGE = ROOT / "kvmufw_hook"
# what callers may import from backends/: the registry, the interface, and the helpers
# that are no firewall backend (hairpin mode of bridge ports, netlink probes, tags)
ALLOWED = {"kvmufw_hook.backends", "kvmufw_hook.backends.base",
           "kvmufw_hook.backends.bridgeports", "kvmufw_hook.backends.nftprobe",
           "kvmufw_hook.backends.tags"}


def _imports(path, package=PACKAGE):
    module = "kvmufw_hook." + ".".join(path.relative_to(package).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level \
                else node.module
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def offenders(package=PACKAGE):
    modules = {p.stem for p in (package / "backends").glob("*.py")}
    out = []
    for path in sorted(package.rglob("*.py")):
        if "backends" in path.relative_to(package).parts:
            continue
        for name in _imports(path, package):
            parts = name.split(".")
            if parts[:2] == ["kvmufw_hook", "backends"] and len(parts) > 2 \
                    and parts[2] in modules and ".".join(parts[:3]) not in ALLOWED:
                out.append(f"{path.relative_to(package.parent)}: {'.'.join(parts[:3])}")
    return sorted(set(out))


def test_no_module_outside_backends_imports_a_concrete_backend():
    assert offenders() == []


def test_every_registered_backend_module_declares_itself_a_backend():
    """The compile-time check is there for each registry entry (mypy runs it in CI)."""
    for name in backends.names():
        module, _class = backends.REGISTRY[name]
        text = (PACKAGE / "backends" / f"{module}.py").read_text()
        assert "_IS_A_BACKEND: Backend[" in text, name
