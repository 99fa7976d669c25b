"""The sweep analysis notebook runs top to bottom on a real sweep and saves its figures."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "sweep_analysis.ipynb"
FIGURES = ("loss_vs_length.png", "pareto.png", "forks.png")


def test_notebook_uses_only_the_analysis_api():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    imports = [line.strip() for cell in nb.cells if cell.cell_type == "code"
               for line in cell.source.splitlines() if line.strip().startswith(("import ", "from "))]
    assert "from raypath import analysis" in imports
    allowed = ("import os", "from pathlib import Path", "from raypath import analysis")
    assert all(line in allowed for line in imports), imports


def test_notebook_executes_and_saves_its_figures(tiny_sweep, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    figures = tmp_path / "figures"
    monkeypatch.setenv("RAYPATH_SWEEP_DIR", str(tiny_sweep["dir"]))
    monkeypatch.setenv("RAYPATH_SWEEP_FIGURES", str(figures))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    for name in FIGURES:
        png = figures / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 10_000, name
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= len(FIGURES)  # each figure is also shown inline
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"best trial {tiny_sweep['record']['best']}" in text
