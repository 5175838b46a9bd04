import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HIL_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"
