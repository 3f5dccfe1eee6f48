"""The documents a user reads: the API reference builds, the README's snippet runs as pasted and its
links hold, the performance page is what its JSON says, the dependency floors are the tested ones."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import performance_doc  # noqa: E402


@pytest.mark.slow  # builds the whole API reference in a subprocess
def test_api_reference_builds_from_the_docstrings_without_the_extras(tmp_path):
    # the README's pdoc command, with the optional extras made unimportable (a base install)
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("starlette", "uvicorn", "torch", "tensorflow", "selenium", "nbclient"):
            sys.modules[name] = None
        sys.argv = ["pdoc", "lenet_jax", "-o", {str(tmp_path)!r}, "--docformat", "google"]
        from pdoc.__main__ import cli
        cli()
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "Error importing" not in r.stderr and "Traceback" not in r.stderr
    explain = (tmp_path / "lenet_jax" / "explain.html").read_text()
    for name in ("lrp", "lrp_layerwise", "saliency", "grad_cam", "COMPOSITES"):
        assert f'id="{name}"' in explain, name
    for page in ("explain/metrics.html", "serve/explorer.html", "serve/app.html"):
        assert (tmp_path / "lenet_jax" / page).exists(), page


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end > 0 else None]


def test_the_readme_snippet_runs_as_pasted():
    section = _section((ROOT / "README.md").read_text(), "## Explain your own model")
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
    explain, f, x = ns["explain"], ns["f"], ns["x"]
    assert explain.layer_names(f, x) == ["Conv_0", "Dense_0"]  # as the snippet's comment says
    np.testing.assert_allclose(ns["r"], explain.lrp(f, x, composite="epsilon_plus_flat"), atol=1e-6)
    assert ns["cam"].shape == (4, 28, 28) and ns["per_layer"]["Conv_0"].shape == (4, 28, 28, 8)
    assert not np.allclose(ns["rc"], ns["r"])
    curves = ns["curves"]
    np.testing.assert_allclose(curves["logit"][:, 0], f(x)[jnp.arange(4), jnp.argmax(f(x), 1)])


def test_the_performance_page_and_readme_table_are_rendered_from_one_json():
    results = json.loads((ROOT / "docs" / "performance.json").read_text())
    assert (ROOT / "docs" / "performance.md").read_text() == performance_doc.render(results)
    table = performance_doc.readme_table(results)
    assert table in (ROOT / "README.md").read_text()
    assert len(table.splitlines()) == 2 + len(performance_doc.README_RATIOS)


def test_the_oldest_pins_are_the_pyproject_floors():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\w.]+)", d).groups() for d in deps)
    pins = dict(
        line.split("==")
        for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins == floors


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
