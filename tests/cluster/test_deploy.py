"""The deployment files agree with the code (issue 13, part 1); no container runtime needed.

deploy/compose.yaml loads as YAML and names the whole topology with pinned images; every
``WEIGHTSTORE_*`` name in deploy/env.example and compose.yaml is a setting of
``weightstore.settings.Settings`` and every setting is documented in env.example; every weightstore
service's command is a real CLI command; deploy/haproxy.cfg passes ``haproxy -c``; the Dockerfile has a
torch-free ``api`` target and an ``export`` target on CPU-only torch wheels, on pinned base images.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tests.cluster.harness import ENV_EXAMPLE, HAPROXY_CFG, ROOT, read_env_file
from weightstore.settings import Settings
from weightstore_cli import app

COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SETTING_NAMES = {f"WEIGHTSTORE_{name.upper()}" for name in Settings.model_fields}
ENV_NAME = re.compile(r"^#?\s*(WEIGHTSTORE_[A-Z0-9_]+)=", re.MULTILINE)


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def weightstore_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if str(svc.get("image", "")).startswith("weightstore-") or "build" in svc
    }


def test_env_example_names_only_real_settings_and_all_of_them() -> None:
    """issue 13, part 1: env.example documents every setting (commented ones show the default) and
    nothing else; a typo there would be silently ignored by pydantic-settings (extra="ignore")."""
    named = set(ENV_NAME.findall(ENV_EXAMPLE.read_text()))
    assert named - SETTING_NAMES == set()
    assert SETTING_NAMES - named == set()


def test_env_example_required_lines_are_placeholders_or_valid() -> None:
    """issue 13, part 1: the uncommented lines, with placeholders filled, make valid Settings."""
    env = read_env_file()
    filled = {
        k: ("tml-" + "x" * 43 if k == "WEIGHTSTORE_INITIAL_ADMIN_KEY" else v.replace("CHANGE_ME", "secret"))
        for k, v in env.items()
    }
    kwargs = {k.removeprefix("WEIGHTSTORE_").lower(): v for k, v in filled.items()}
    settings = Settings(**kwargs)
    assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
    assert settings.auto_migrate is False and settings.embedded_gc is False and settings.embedded_worker is False
    assert settings.session_secret is not None and settings.initial_admin_key is not None


def test_compose_names_the_whole_topology_with_pinned_images() -> None:
    """issue 13, part 1: PostgreSQL 15/16, SeaweedFS master + 3 volume servers with replication 001 +
    filer + S3 with auth, a one-shot migrate running `admin bootstrap`, >= 2 API replicas behind
    HAProxy, collectors and 2 export workers; no image is unpinned."""
    services = compose()["services"]
    for name, svc in services.items():
        image = str(svc.get("image", ""))
        if image.startswith(("weightstore-api:", "weightstore-export:")):
            continue  # built here from the Dockerfile, whose base images test_dockerfile_* checks
        assert re.search(r":[0-9][\w.\-]*$", image), f"{name}: image {image!r} not pinned to a version"
    assert re.match(r"postgres:1[56]\.\d+", services["postgres"]["image"])
    master = services["weed-master"]["command"]
    assert "-defaultReplication=001" in master
    volumes = [n for n in services if n.startswith("weed-volume-")]
    assert len(volumes) == 3
    assert "-config=" in services["s3"]["command"]
    assert services["migrate"]["command"] == ["admin", "bootstrap"]
    assert services["migrate"]["restart"] == "no"
    apis = [n for n, s in services.items() if s.get("command") == ["serve"]]
    assert len(apis) >= 2
    assert services["lb"]["image"].startswith("haproxy:")
    assert all(f"WS_API_{i}" in services["lb"]["environment"] for i in range(1, len(apis) + 1))
    assert len([n for n, s in services.items() if s.get("command", [None])[:2] == ["gc", "worker"]]) >= 1
    assert len([n for n, s in services.items() if s.get("command", [None])[0] == "worker"]) == 2
    for name in apis + ["collector-1", "export-1"]:
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_environment_uses_only_real_settings() -> None:
    """issue 13, part 1: every WEIGHTSTORE_* a service sets is a setting; services read env.example's copy."""
    for name, svc in weightstore_services().items():
        env = svc.get("environment") or {}
        keys = set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
        assert {k for k in keys if k.startswith("WEIGHTSTORE_")} - SETTING_NAMES == set(), name
        assert svc.get("env_file") == ["weightstore.env"], name


@pytest.mark.parametrize("service", sorted(weightstore_services()))
def test_compose_commands_are_real_cli_commands(service: str) -> None:
    """issue 13, part 1: each weightstore service's command parses (``--help`` on its options)."""
    command = weightstore_services()[service]["command"]
    words = [w for w in command if not w.startswith("-")]
    options = [w for w in command if w.startswith("--")]
    result = CliRunner().invoke(app, [*words[: 2 if words[0] in ("gc", "admin") else 1], "--help"])
    assert result.exit_code == 0, result.output
    for opt in options:
        assert opt in result.output, f"{service}: {opt} is not an option of {' '.join(words)}"


def test_haproxy_config_is_valid() -> None:
    """issue 13, part 1: deploy/haproxy.cfg (shared by compose and the harness) passes ``haproxy -c``."""
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if haproxy is None:
        pytest.skip("haproxy not installed (make sysdeps)")
    env = {"WS_LB_BIND": "127.0.0.1:18080", "WS_API_1": "127.0.0.1:1", "WS_API_2": "127.0.0.1:2", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_has_slim_api_and_cpu_torch_export_targets() -> None:
    """issue 13, found 10: API/collector image without the ML stack, export image with CPU-only
    torch; base images pinned to a patch version."""
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+) AS (\S+)$", text, re.MULTILINE)
    stages = {alias: image for image, alias in froms}
    assert {"api", "export"} <= set(stages)
    assert re.match(r"python:3\.11\.\d+-slim-\w+$", stages["base"])
    assert stages["api"] == "api-deps" and stages["api-deps"] == "base"
    assert stages["export"] == "export-deps" and stages["export-deps"] == "api-deps"
    export_deps = text.split("AS export-deps", 1)[1].split("FROM ", 1)[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in export_deps
    assert "requirements-core.txt" in text.split("AS api-deps", 1)[1].split("FROM ", 1)[0]


def test_api_and_collector_import_no_ml_stack() -> None:
    """issue 13, found 10: what the api image runs (serve's app, bootstrap, the collector, the CLI)
    imports neither torch, transformers nor peft at start-up, so the slim image can run it."""
    code = (
        "import sys, weightstore_cli, weightstore_api.app, weightstore.bootstrap, weightstore_gc.scheduler, weightstore.worker;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    done = subprocess.run([str(Path(ROOT / ".venv/bin/python")), "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0 and not (ROOT / ".venv/bin/python").exists():
        pytest.skip("no .venv")
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
