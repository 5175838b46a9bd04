"""The Backend contract: every implementation in ``hil.chip.backends.BACKENDS`` must pass all of it.

A new backend (an instrument-backed chip, say) is added to ``BACKENDS`` or to ``EXTRA`` below
and runs through the same tests.
"""

import json

import numpy as np
import pytest

from hil.chip.backends import BACKENDS, Backend, BackendError, Measurement, make_backend
from hil.config import ModelConfig
from hil.errors import ConfigError

MC = ModelConfig(n_layers=2, n_hidden=5, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4, w_clip_dt=0.9, b_clip_dt=0.2)
N_IN, CENTRE = 2, 0.3
EXTRA: dict[str, object] = {  # name -> factory(seed) for backends not built by make_backend
    "lab": lambda seed: make_backend("lab:lab_configs/virtual.yaml", MC, N_IN, CENTRE, seed),
}


def build(name: str, seed: int = 0) -> Backend:
    if name in EXTRA:
        return EXTRA[name](seed)  # type: ignore[operator]
    return make_backend(name, MC, N_IN, CENTRE, seed)


@pytest.fixture(params=sorted([*BACKENDS, *EXTRA]))
def name(request):
    return request.param


def layers(spec, scale: float = 0.3, seed: int = 0, bias: float = 0.05):
    rng = np.random.default_rng(seed)
    N = spec.n_hidden
    out = []
    for li in range(spec.n_layers):
        w_int = rng.uniform(-scale, scale, (N, N))
        np.fill_diagonal(w_int, 0.0)
        out.append({"W_ext": rng.uniform(-scale, scale, (N, spec.n_in if li == 0 else N)),
                    "W_int": w_int, "b": np.full(N, bias)})
    return out


def inputs(B=3, T=12, seed=1):
    return np.random.default_rng(seed).random((B, T, N_IN))


def test_spec_describes_the_structure(name):
    with build(name) as be:
        sp = be.spec
        assert (sp.n_in, sp.n_layers, sp.n_hidden) == (N_IN, 2, 5)
        assert sp.M == 10 and sp.dt_ns > 0 and sp.w_max > 0 and sp.b_max > 0
        assert isinstance(sp.offers_states, bool)


def test_run_returns_measurements_of_the_right_shape(name):
    with build(name) as be:
        be.upload(layers(be.spec))
        m = be.run(inputs(B=3, T=12))
        assert isinstance(m, Measurement)
        assert m.outputs.shape == (3, 12, 5) and np.isfinite(m.outputs).all()
        assert m.device_time_s > 0
        if be.spec.offers_states:
            assert m.states.shape == (3, 12, 10) and m.filtered.shape == (3, 12, 10)
            np.testing.assert_array_equal(m.outputs, m.states[..., 5:])
        else:
            assert m.states is None


def test_uploaded_parameters_change_what_is_measured(name):
    with build(name) as be:
        u = inputs()
        be.upload(layers(be.spec, bias=-0.15))
        low = be.run(u).outputs
        be.upload(layers(be.spec, bias=0.15))
        high = be.run(u).outputs
        assert high.mean() > low.mean() + 0.02  # a larger bias drives the oscillators harder


def test_same_seed_same_calls_same_measurement(name):
    res = []
    for _ in range(2):
        with build(name, seed=4) as be:
            be.upload(layers(be.spec))
            res.append(be.run(inputs()).outputs)
    np.testing.assert_array_equal(res[0], res[1])


def test_describe_reports_identity_parameters_and_counters(name):
    with build(name) as be:
        d0 = be.describe()
        be.upload(layers(be.spec))
        be.run(inputs(B=3))
        be.run(inputs(B=2))
        d = be.describe()
        json.dumps(d)  # plain JSON for run folders
        assert d["backend"] == name and d["identity"] and isinstance(d["parameters"], dict)
        assert d0["counters"]["runs"] == 0
        c = d["counters"]
        assert (c["uploads"], c["runs"], c["sequences"]) == (1, 2, 5)
        assert c["device_time_s"] > 0 and not d["closed"]


def test_run_before_upload_is_refused(name):
    with build(name) as be, pytest.raises(BackendError, match="before upload"):
        be.run(inputs())


@pytest.mark.parametrize("damage, words", [
    (lambda ls: ls[:1], "expected 2 layers"),
    (lambda ls: [{**ls[0], "b": np.zeros(3)}, ls[1]], r"layers\[0\].b must have shape"),
    (lambda ls: [ls[0], {k: v for k, v in ls[1].items() if k != "W_int"}], r"layers\[1\].W_int is missing"),
    (lambda ls: [{**ls[0], "W_ext": np.full((5, N_IN), np.nan)}, ls[1]], "non-finite"),
    (lambda ls: [ls[0], {**ls[1], "W_int": np.ones((5, 5))}], "zero diagonal"),
])
def test_bad_uploads_are_refused_with_the_key(name, damage, words):
    with build(name) as be, pytest.raises(BackendError, match=words):
        be.upload(damage(layers(be.spec)))


def test_bad_inputs_are_refused(name):
    with build(name) as be:
        be.upload(layers(be.spec))
        with pytest.raises(BackendError, match="inputs must have shape"):
            be.run(np.zeros((2, 4, N_IN + 1)))
        with pytest.raises(BackendError, match="finite"):
            be.run(np.full((1, 3, N_IN), np.inf))


def test_context_manager_closes_and_closed_backends_refuse_work(name):
    with build(name) as be:
        be.upload(layers(be.spec))
    assert be.closed and be.describe()["closed"]
    be.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        be.run(inputs())
    with pytest.raises(BackendError, match="closed"):
        be.upload(layers(be.spec))
    with pytest.raises(BackendError, match="closed"), be:
        pass


def test_tensors_are_accepted_as_well_as_arrays(name):
    import torch

    with build(name) as be:
        be.upload([{k: torch.as_tensor(v, dtype=torch.float32) for k, v in lw.items()}
                   for lw in layers(be.spec)])
        assert be.run(torch.rand(2, 5, N_IN)).outputs.shape == (2, 5, 5)


def test_unknown_backend_and_bad_device_settings_name_the_key():
    with pytest.raises(ConfigError, match="--backend: unknown backend 'chip'"):
        make_backend("chip", MC, 1, 0.0, 0)
    with pytest.raises(ConfigError, match="device.cv_gama: unknown key"):
        make_backend("sim", MC, 1, 0.0, 0, ["cv_gama=0.2"])
    with pytest.raises(ConfigError, match="device.thermal_d_ghz: must be a number >= 0"):
        make_backend("sim", MC, 1, 0.0, 0, {"thermal_d_ghz": -1})
    with pytest.raises(ConfigError, match="device settings look like KEY=VALUE"):
        make_backend("sim", MC, 1, 0.0, 0, ["cv_gamma"])
