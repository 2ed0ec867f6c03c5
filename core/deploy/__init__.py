"""Deployment files shipped with sluice: Kubernetes manifests (``k8s/``), the
``Dockerfile`` of the image they name, and ``README.md``, the fleet picture.

They live in the package, as data, because the repository's top level is
fixed (the issue asked for ``deploy/k8s/``); so they also travel with an
installed sluice: ``python -c "from sluice import deploy; print(deploy.files())"``
prints their paths, as ``sluice.plugins.alerts.files()`` does for the
Prometheus rules. Nothing here is imported by sluice at run time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["files", "manifests"]


def files() -> dict[str, Path]:
    """Every shipped deployment file, by its path under ``sluice/deploy``
    (``"k8s/gateway-deployment.yaml"``, ``"Dockerfile"``, ...)."""
    root = Path(str(resources.files(__name__)))
    out = {name: root / name for name in ("Dockerfile", "Dockerfile.dockerignore", "README.md")}
    out.update({f"k8s/{p.name}": p for p in manifests()})
    return out


def manifests() -> list[Path]:
    """The Kubernetes manifests, in name order: apply them with
    ``kubectl apply -f`` on their directory."""
    root = Path(str(resources.files(__name__)))
    return sorted((root / "k8s").glob("*.yaml"))
