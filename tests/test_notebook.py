"""examples/quickstart.ipynb: committed without outputs, and run top to bottom in a real Jupyter kernel."""

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    """Outputs are stripped before committing (`jupyter nbconvert --clear-output --inplace`)."""
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert "widgets" not in nb["metadata"]  # no saved widget state either


def test_quickstart_runs_top_to_bottom_in_a_kernel():
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a cell that raises fails the run (CellExecutionError names the cell and the error)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "same text with and without the drafter" in text and "tokens per step: packaged drafter" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # acceptance per step, benchmark, eval and training plots, each shown once
    tables = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 3 and "| redrafter greedy |" in tables[0] and "| 4 | 4 | yes |" in tables[1]
    assert "top-1 per drafted position" in tables[2]
    assert not [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]  # no warning, no note
