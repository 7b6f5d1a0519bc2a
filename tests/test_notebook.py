"""The notebooks run end to end at small settings, and are stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["parameterizations", "evaluate_run", "compare_sweep"]


def run_notebook(name: str, settings: str, tmp_path: Path, monkeypatch) -> list:
    """Execute the notebook with `settings` inserted after its parameters cell; returns the code cells' outputs."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(settings))
    # A kernelspec for this very interpreter, found first, so a fresh venv needs no manual setup.
    write_kernel_spec(tmp_path / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def figures(outputs: list) -> list:
    return [o for o in outputs if "image/png" in o.get("data", {})]


def text(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"clear the outputs of {name}.ipynb"


def test_parameterizations_notebook_runs_at_small_settings(tmp_path, monkeypatch):
    small = "N_SAMPLES = 200\nN_TRAJECTORIES = 3\nSTEPS = 4\nERROR_STEPS = [2, 4]"
    assert len(figures(run_notebook("parameterizations", small, tmp_path, monkeypatch))) == 3


def test_evaluate_run_notebook_samples_a_run_and_scores_it(trained_run, tmp_path, monkeypatch):
    """With its default RUN_DIR it takes the newest run it can score, passing over newer ones it cannot."""
    monkeypatch.setenv("LDM_ROOT", str(tmp_path))  # runs/ and the cached reference statistics: the test's folder
    scorable = place_runs(trained_run, tmp_path / "runs")
    small = ("N_SAMPLES = 30\nBATCH_SIZE = 16\nSTEPS = 2\nN_TRAJECTORIES = 2\n"
             "METRICS_OVERRIDES = ['metrics.kid_subsets=5']")
    outputs = run_notebook("evaluate_run", small, tmp_path, monkeypatch)
    assert len(figures(outputs)) == 2, "expected the sample grid and the trajectories"
    printed = text(outputs)
    assert f"\n{scorable}: DiT" in f"\n{printed}", printed[:1000]  # the run it took
    assert "fd_digits" in printed and "accuracy_digits" in printed
    assert list((tmp_path / ".cache" / "ldm" / "metrics").glob("reference-digits-train-*.safetensors"))


def place_runs(trained_run: Path, runs: Path) -> Path:
    """A scorable run under `runs`, and newer ones evaluation cannot score with its defaults: an autoencoder run,
    a run on a folder of images (no metrics of its own), a run without a checkpoint. Returns the scorable one."""
    import shutil
    import time

    from omegaconf import OmegaConf

    scorable = runs / "2026-01-01" / "10-00-00"
    shutil.copytree(trained_run, scorable)
    config = OmegaConf.load(scorable / ".hydra" / "config.yaml")
    time.sleep(0.01)  # the decoys' checkpoints are newer
    for name, change in (("autoencoder", {"task": "autoencoder"}),
                         ("folder", {"data": {"train": {"_target_": "ldm.data.folder.FolderDataset"}}}),
                         ("no_checkpoint", {})):
        run = runs / "2026-01-02" / name
        (run / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.merge(config, change), run / ".hydra" / "config.yaml")
        if name != "no_checkpoint":
            (run / "checkpoints").mkdir()
            shutil.copy(scorable / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    return scorable


def test_compare_sweep_notebook_plots_a_sweep(tmp_path, monkeypatch):
    from ldm.evaluation.record import write_metrics

    for job, (sampler, steps, nfe) in enumerate([("euler", 2, 2), ("euler", 4, 4), ("heun", 2, 3), ("heun", 4, 7)]):
        write_metrics(tmp_path / "sweep" / str(job), {"fd_digits": 10.0 / nfe, "accuracy_digits": 1 - 1 / nfe},
                      {"sampler_name": sampler, "steps": steps, "nfe": nfe, "guidance": 2.0})
    write_metrics(tmp_path / "sweep" / "floor", {"fd_digits": 0.5, "accuracy_digits": 0.99}, {"real": "val"})
    outputs = run_notebook("compare_sweep", f"SWEEP_DIR = {str(tmp_path / 'sweep')!r}", tmp_path, monkeypatch)
    assert len(figures(outputs)) == 2, "expected quality against NFE and the samplers side by side"
    printed = text(outputs)
    assert "heun" in printed and "real val" in printed
