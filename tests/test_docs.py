"""The documents a user reads: the API reference builds, the README stays short and its links hold."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_builds_from_the_docstrings(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pdoc", "lenet_jax", "-o", str(tmp_path), "--docformat", "google"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "Error importing" not in r.stderr and "Traceback" not in r.stderr
    explain = (tmp_path / "lenet_jax" / "explain.html").read_text()
    for name in ("lrp", "lrp_layerwise", "saliency", "grad_cam", "COMPOSITES"):
        assert f'id="{name}"' in explain, name
    assert (tmp_path / "lenet_jax" / "serve" / "explorer.html").exists()


def test_readme_is_short_and_every_local_link_exists():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), link


def test_license_and_citation():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
