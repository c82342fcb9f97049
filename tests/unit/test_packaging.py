"""UpCLIP installs with pip and its commands work outside the checkout.

The install test makes a fresh venv (``python -m venv --without-pip``) whose only link to this
one is a ``.pth`` file naming this interpreter's site-packages: the dependencies (torch alone is
5.5 GB, ~80 s from local disk) are reused instead of installed, while ``upclip`` itself is
installed into the fresh venv only. ``pip install --no-index --no-build-isolation`` then checks
our declared dependencies against the versions CI runs without downloading anything (a wrong
name or a range that excludes them fails the install). ``--system-site-packages`` would not do:
it exposes the base interpreter's site-packages, which hold none of the dependencies.
Measured here: ~7 s install, ~15 s for ``--help`` and the 2-step run.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHIPPED = ("pyproject.toml", "README.md", "trainer", "kernels", "tools", "configs")


def package_dir(package: str) -> Path:
    mapping = PYPROJECT["tool"]["setuptools"].get("package-dir", {})
    return ROOT / mapping.get(package, package.replace(".", "/"))


def test_every_package_and_data_file_is_listed():
    """pyproject.toml lists its packages (configs/ ships as trainer/configs, which a `find`
    cannot express): a new subpackage or non-Python file must be added there."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("trainer", "kernels", "tools") for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {found - listed}"
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    tracked = subprocess.run(["git", "ls-files", "trainer", "kernels", "tools", "configs"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        path = ROOT / rel
        if path.suffix == ".py" or path.name == ".gitignore":
            continue
        owner = max((p for p in listed if path.parent == package_dir(p)), key=len, default=None)
        assert owner and any(fnmatch(path.name, pat) for pat in data.get(owner, [])), \
            f"{rel} is not shipped: add it to [tool.setuptools.package-data]"


def test_console_scripts_name_existing_functions():
    from tools.cli import COMMANDS
    targets = list(PYPROJECT["project"]["scripts"].values())
    targets += [f"{module}:main" for module, _ in COMMANDS.values()]
    for target in targets:
        module, func = target.split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        defs = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert func in defs, target


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src, venv = tmp / "src", tmp / "venv"
    src.mkdir()
    for name in SHIPPED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "_build", "*.so"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "upclip_test_deps.pth").write_text("\n".join(ours) + "\n")
    # no launch variables: a dist1 group of this pytest process set MASTER_PORT (in use)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                        "MASTER_PORT")}
    p = subprocess.run([py, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", str(src)],
                       env=env, capture_output=True, text=True, timeout=300)
    # make setup's venv has a setuptools that builds wheels offline (torch requires setuptools;
    # Python 3.11's bundled 65.5 would fail with "invalid command 'bdist_wheel'")
    assert p.returncode == 0, p.stderr[-3000:]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv, Path(site), elsewhere, env


def run(installed, *args, timeout=120):
    venv, _, cwd, env = installed
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_installed_copy_is_imported(installed):
    _, site, _, _ = installed
    p = run(installed, "python", "-c", "import trainer, kernels, tools; print(trainer.__file__,"
                                       " kernels.__file__, tools.__file__)")
    assert p.returncode == 0, p.stderr
    assert all(Path(f).is_relative_to(site) for f in p.stdout.split()), p.stdout
    assert (site / "trainer" / "configs" / "smoke.yaml").is_file()
    assert (site / "kernels" / "csrc" / "sm90_grouped_gemm.cu").is_file()  # python -m kernels.build
    assert not (site / "kernels" / "_build").exists()  # the extension is never built at install


def test_upclip_train_help_and_packaged_config(installed):
    p = run(installed, "upclip-train", "--help")
    assert p.returncode == 0 and p.stdout.startswith("usage: upclip-train"), p.stderr
    assert "exit codes:" in p.stdout and "smoke" in p.stdout
    p = run(installed, "upclip-train", "--config", "smoke", "--print-config")
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(p.stdout)["parallel"]["ep"] == 2  # configs/smoke.yaml, as packaged
    p = run(installed, "upclip", "--help")
    assert p.returncode == 0 and "convert" in p.stdout and "shards" in p.stdout


def test_two_step_tiny_run_outside_the_checkout(installed):
    _, _, cwd, _ = installed
    p = run(installed, "upclip", "train", "--train.steps", "2", "model.preset=tiny",
            "train.progress_bar=false", "train.tensorboard=false", "--run_dir=run", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    status = json.loads((cwd / "run" / "exit_status.json").read_text())
    assert (status["exit_code"], status["step"]) == (0, 2)
    steps = [json.loads(line).get("step") for line in (cwd / "run" / "metrics.jsonl").open()]
    assert steps[-1] == 2
