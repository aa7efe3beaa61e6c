#!/usr/bin/env python3
"""Checks of deploy/ that .ci/run runs (docs/kubernetes.md, "What CI checks").

    check.py docker-context OUT        copy the Docker build context (the repository filtered by
                                       .dockerignore) to OUT, so that CI can build from exactly that
    check.py kustomize                 every kustomization under deploy/ lists files that exist, and every
                                       manifest next to it is listed; prints the standalone manifests
    check.py render KUBECTL OUT        render every kustomization (and the base with each component of
                                       deploy/kubernetes/optional) with `KUBECTL kustomize`; prints the files
    check.py configs SIDECAR FILE...   for every rendered Deployment with a rutter-sidecar container, run
                                       `SIDECAR check-config` on the config.toml of the ConfigMap it mounts,
                                       with the container's literal RUTTER_SIDECAR__* variables

Runs on the Python of the CI virtualenv (PyYAML comes with kubernetes-validate); `docker-context` needs
only the standard library. Exits 1 with a message on the first kind of problem found.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "kubernetes"
OPTIONAL = BASE / "optional"
SIDECAR_CONTAINER = "rutter-sidecar"
ENV_PREFIX = "RUTTER_SIDECAR__"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def rel(path: Path) -> str:
    return os.path.relpath(path, REPO)


# --------------------------------------------------------------------------------------------------------
# docker-context: .dockerignore semantics (moby/patternmatcher): patterns in order, `!` re-includes, the last
# match wins, and a pattern matches a path when it matches the path or one of its parent directories.
# --------------------------------------------------------------------------------------------------------


def pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] in "[\\":
            fail(f".dockerignore: character classes and escapes are not supported here: {pattern!r}")
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path) -> list[tuple[bool, str, re.Pattern[str]]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        rules.append((negate, pattern, pattern_regex(pattern)))
    return rules


def excluded(path: str, rules) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, _, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            result = not negate
    return result


def may_reinclude(directory: str, rules) -> bool:
    """Whether a `!` rule could re-include something below an excluded directory."""
    for negate, pattern, _ in rules:
        if not negate:
            continue
        literal = re.split(r"[*?]", pattern, maxsplit=1)[0]
        if pattern.startswith("*") or literal.startswith(directory + "/") or directory.startswith(literal.rstrip("/")):
            return True
    return False


def docker_context(out: Path) -> None:
    rules = dockerignore_rules(REPO / ".dockerignore")
    if out.exists():
        shutil.rmtree(out)
    count = 0
    for root, dirs, files in os.walk(REPO):
        base = os.path.relpath(root, REPO)
        base = "" if base == "." else base + "/"
        dirs[:] = sorted(
            d for d in dirs if not (excluded(base + d, rules) and not may_reinclude(base + d, rules))
        )
        for name in sorted(files):
            path = base + name
            if excluded(path, rules):
                continue
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, target)
            count += 1
    print(f"docker build context: {count} files copied to {out}")


# --------------------------------------------------------------------------------------------------------
# kustomize: file lists
# --------------------------------------------------------------------------------------------------------


def load_yaml(path: Path):
    import yaml  # PyYAML, from the CI virtualenv

    with path.open() as stream:
        return yaml.safe_load(stream)


def load_yaml_all(path: Path) -> list:
    import yaml

    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml") if "target" not in p.parts)


def referenced(directory: Path, kustomization: dict) -> tuple[list[Path], list[Path], list[Path]]:
    """(resource files, directories, other files) that a kustomization refers to, resolved."""
    resources, directories, others = [], [], []
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = (directory / entry).resolve()
        (directories if path.is_dir() else resources).append(path)
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            others.append((directory / patch["path"]).resolve())
    for generator in kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", []):
        for entry in generator.get("files", []):
            others.append((directory / entry.split("=", 1)[-1]).resolve())
        for entry in generator.get("envs", []):
            others.append((directory / entry).resolve())
    return resources, directories, others


def check_kustomize() -> None:
    standalone = []
    for directory in kustomizations():
        document = load_yaml(directory / "kustomization.yaml")
        resources, directories, others = referenced(directory, document)
        for path in resources + directories + others:
            if not path.exists():
                fail(f"{rel(directory / 'kustomization.yaml')} refers to {rel(path)}, which does not exist")
        for path in directories:
            if not (path / "kustomization.yaml").exists():
                fail(f"{rel(directory / 'kustomization.yaml')} refers to {rel(path)}, which has no kustomization.yaml")
        listed = set(resources + others)
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name != "kustomization.yaml" and path.suffix in {".yaml", ".yml", ".toml", ".env", ".json"}:
                if path.resolve() not in listed:
                    fail(f"{rel(path)} is not listed in {rel(directory / 'kustomization.yaml')}")
        standalone += [p for p in resources if p.suffix in {".yaml", ".yml"}]
        print(f"ok: {rel(directory / 'kustomization.yaml')} ({document.get('kind')}): "
              f"{len(resources) + len(directories) + len(others)} references, all present; every file here listed",
              file=sys.stderr)
    for path in sorted(set(standalone)):
        print(rel(path))


# --------------------------------------------------------------------------------------------------------
# render: every buildable kustomization, and the base with each optional component
# --------------------------------------------------------------------------------------------------------


def render(kubectl: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    roots = []
    for directory in kustomizations():
        kind = load_yaml(directory / "kustomization.yaml").get("kind", "Kustomization")
        if kind == "Kustomization":
            roots.append((rel(directory).replace("/", "_"), directory))
    scratch = Path(tempfile.mkdtemp(prefix="kustomize-components-"))
    try:
        for component in sorted(p for p in OPTIONAL.iterdir() if (p / "kustomization.yaml").exists()):
            overlay = scratch / component.name
            overlay.mkdir()
            # kustomize takes relative paths only.
            (overlay / "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - {os.path.relpath(BASE, overlay)}\n"
                f"components:\n  - {os.path.relpath(component, overlay)}\n"
            )
            roots.append((f"base+optional_{component.name}", overlay))
        for name, directory in roots:
            target = out / f"{name}.yaml"
            result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
            if result.returncode != 0:
                fail(f"kustomize {name} failed:\n{result.stderr}")
            target.write_text(result.stdout)
            print(target)
    finally:
        shutil.rmtree(scratch)


# --------------------------------------------------------------------------------------------------------
# configs: check-config on what the rendered pods will really read
# --------------------------------------------------------------------------------------------------------


def check_configs(sidecar: str, files: list[str]) -> None:
    checked = 0
    for file in files:
        documents = load_yaml_all(Path(file))
        config_maps = {d["metadata"]["name"]: d for d in documents if d.get("kind") == "ConfigMap"}
        for deployment in (d for d in documents if d.get("kind") == "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            containers = spec.get("initContainers", []) + spec.get("containers", [])
            sidecar_container = next((c for c in containers if c["name"] == SIDECAR_CONTAINER), None)
            if sidecar_container is None:
                continue
            if sidecar_container.get("restartPolicy") != "Always" or sidecar_container not in spec.get("initContainers", []):
                fail(f"{file}: {SIDECAR_CONTAINER} is not a native sidecar (initContainers, restartPolicy: Always)")
            args = sidecar_container.get("args", [])
            if "--config" not in args or args.index("--config") + 1 >= len(args):
                fail(f"{file}: {SIDECAR_CONTAINER} has no --config argument")
            config_path = args[args.index("--config") + 1]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            text = None
            for mount in sidecar_container.get("volumeMounts", []):
                prefix = mount["mountPath"].rstrip("/") + "/"
                volume = volumes.get(mount["name"], {})
                if config_path.startswith(prefix) and "configMap" in volume:
                    name = volume["configMap"]["name"]
                    if name not in config_maps:
                        fail(f"{file}: the volume {mount['name']} names ConfigMap {name}, which is not rendered")
                    key = config_path[len(prefix):]
                    text = config_maps[name].get("data", {}).get(key)
                    if text is None:
                        fail(f"{file}: ConfigMap {name} has no key {key} (read as {config_path})")
            if text is None:
                fail(f"{file}: {config_path} is not mounted from a ConfigMap")
            env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
            overrides = {
                e["name"]: e["value"]
                for e in sidecar_container.get("env", [])
                if e["name"].startswith(ENV_PREFIX) and "value" in e
            }
            env.update(overrides)
            with tempfile.NamedTemporaryFile("w", suffix=".toml") as config:
                config.write(text)
                config.flush()
                result = subprocess.run([sidecar, "check-config", "--config", config.name], env=env,
                                        capture_output=True, text=True)
            if result.returncode != 0:
                fail(f"{file}: check-config of {config_path} with {sorted(overrides)} failed:\n{result.stderr}")
            checked += 1
            shown = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "no overrides"
            print(f"ok: {file}: deployment/{deployment['metadata']['name']}: {config_path} ({shown})")
    if checked == 0:
        fail("no Deployment with a rutter-sidecar container found")


def main(argv: list[str]) -> None:
    match argv:
        case ["docker-context", out]:
            docker_context(Path(out))
        case ["kustomize"]:
            check_kustomize()
        case ["render", kubectl, out]:
            render(kubectl, Path(out))
        case ["configs", sidecar, *files] if files:
            check_configs(sidecar, files)
        case _:
            print(__doc__, file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
