"""Every rule of the workflow names a conda environment that provides what its command imports.

Conda channels are not reachable here, so instead of building the environments this test
reads them: for each rule, the `deephemnma <command>` it runs, every module that command can
import (the package's modules followed transitively, imports inside functions included),
and the third-party packages among them; each must be listed in the rule's envs/*.yaml.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PKG = REPO / "deephemnma"
# import name → distribution names that provide it (conda or pip spelling)
PROVIDERS = {
    "torch": {"torch", "pytorch", "pytorch-cpu", "pytorch-gpu"},
    "torchvision": {"torchvision"},
    "sklearn": {"scikit-learn"},
    "yaml": {"pyyaml"},
    "matplotlib": {"matplotlib", "matplotlib-base"},
    "PIL": {"pillow"},
    "tensorboard": {"tensorboard"},
    "horovod": {"horovod"},
}


def rule_blocks():
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [m for m in re.finditer(r"^(rule|checkpoint) (\w+):", text, flags=re.M)]
        for i, m in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
            yield smk, m.group(2), text[m.start():end]


def module_file(name: str) -> Path | None:
    rel = name.split(".")[1:]
    p = PKG.joinpath(*rel)
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def imports_of(path: Path, modname: str) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg = modname if path.name == "__init__.py" else modname.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # submodules imported by name
            else:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def third_party_closure(start: str) -> set[str]:
    seen, todo, third = set(), [start], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = module_file(mod)
        if path is None:
            continue
        for imp in imports_of(path, mod):
            top = imp.split(".")[0]
            if top == "deephemnma":
                parts = imp.split(".")
                for k in range(2, len(parts) + 1):  # the package chain: deephemnma.a, deephemnma.a.b
                    todo.append(".".join(parts[:k]))
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return third


def env_packages(env_file: Path) -> set[str]:
    doc = yaml.safe_load(env_file.read_text())
    names = set()
    # a package built after the environment is created (Snakemake's <env>.post-deploy.sh)
    post = env_file.with_name(env_file.stem + ".post-deploy.sh")
    if post.is_file() and "install_horovod.sh" in post.read_text():
        names.add("horovod")
    for dep in doc.get("dependencies", []):
        if isinstance(dep, dict):
            for p in dep.get("pip", []):
                if not p.startswith("-"):
                    names.add(re.split(r"[=<>!~\[ ]", p, maxsplit=1)[0].lower())
        else:
            names.add(re.split(r"[=<>!~ ]", dep, maxsplit=1)[0].lower())
    return names


def provided(module: str, packages: set[str]) -> bool:
    wanted = PROVIDERS.get(module, {module.lower(), module.lower().replace("_", "-")})
    return bool(wanted & packages)


def rule_commands():
    rules = []
    for smk, name, block in rule_blocks():
        if "shell:" not in block:
            continue  # run:/localrule blocks execute inside Snakemake itself
        cmd = re.search(r"\{(?:DH|params\.launch)\} (\w[\w-]*)", block)
        conda = re.search(r'conda:\s*\n\s*"([^"]+)"', block)
        rules.append((smk, name, cmd.group(1) if cmd else None, conda.group(1) if conda else None))
    return rules


def test_every_shell_rule_names_an_existing_env_and_runs_deephemnma():
    rules = rule_commands()
    assert len(rules) >= 15
    for smk, name, cmd, conda in rules:
        assert conda is not None, f"{smk.name}: rule {name} names no conda environment"
        env = (smk.parent / conda).resolve()
        assert env.is_file(), f"{smk.name}: rule {name}: {conda} not found"
        assert cmd is not None, f"{smk.name}: rule {name} does not run a deephemnma command"
        assert module_file(f"deephemnma.commands.{cmd.replace('-', '_')}") is not None, f"no command {cmd}"


@pytest.mark.parametrize("smk,name,cmd,conda", rule_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_env_provides_every_import(smk, name, cmd, conda):
    env = (smk.parent / conda).resolve()
    packages = env_packages(env)
    assert "python" in packages
    needed = third_party_closure(f"deephemnma.commands.{cmd.replace('-', '_')}")
    assert "numpy" in needed  # the analysis does follow the package
    missing = sorted(m for m in needed if not provided(m, packages))
    assert not missing, f"rule {name} ({cmd}) imports {missing}, not provided by {env.name}"
