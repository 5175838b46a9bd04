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


def require_native_or_skip():
    """The native kernel's library: the test is skipped when it cannot be built (no compiler),
    but fails when ``HIL_REQUIRE_NATIVE=1`` (CI), where a missing kernel is a bug."""
    from hil.network import engine

    try:
        lib = engine.native_library()  # raises under HIL_REQUIRE_NATIVE=1
    except RuntimeError as e:
        pytest.fail(f"native kernel required (HIL_REQUIRE_NATIVE=1) but unavailable: {e}")
    if lib is None:
        pytest.skip("native kernel unavailable (no C++ compiler); HIL_REQUIRE_NATIVE=1 fails instead")
    return lib


@pytest.fixture
def native_lib():
    """The native kernel (see :func:`require_native_or_skip`)."""
    return require_native_or_skip()
