"""The hybrid hardware-software convolutional network, end to end on a bench (thesis ch. 4).

``deploy`` takes a network trained by ``hil conv train`` and runs the thesis's procedure
(4.8) on a lab, through the drivers only. Each step is a public function that returns a frozen
dataclass the next step takes, so the procedure can be run (and stopped, and inspected) one
step at a time; ``deploy`` is these steps in order::

    network = load_network(model, cfg.n_images)                        # TrainedNetwork
    ref = measure_reference(cfg, lab_cfg, run)                         # ReferenceStep
    design = design_chains(cfg, lab_cfg, network, ref, run)            # DesignStep
    with open_bench(lab_cfg, design) as lab:
        src = calibrate_sources(lab, cfg, network, ref, run)           # SourceStep
        placement = place_chains(lab, cfg, network, ref, design, src)  # PlacementStep
        inference = run_inference(lab, cfg, network, design, src, placement, run)
    results = write_report(network, src, placement, inference, run)

1. ``measure_reference``: the reference-diode map (thesis 3.5.1; measured on the virtual lab's
   reference sample unless a map is given), its Kittel fit and power rescaling;
2. ``design_chains``: the kernels -> chain designs (Algorithm 1) -> fabrication (on a virtual
   lab: the design becomes the world's sample, with its fabrication errors and a hand-glued
   placement);
3. ``calibrate_sources``: on the bench with the fabricated chains, the multi-channel source
   calibration (4.5.2) and the source's settling time constant
   (``calibration.mac.measure_source_settling``);
4. ``place_chains``: each chain located from a frequency sweep, then Algorithm 2 (Optuna over
   z, eq. 4.4) with single tones from the precise generator; the representative multi-tone
   patches that V_max is fitted on through the VCO source (``calibration.mac.fit_v_max``);
5. ``run_inference``: inference on the first ``n_images`` test images with each measurement
   plan (``calibration.mac``: the planned one and Algorithm 3 as written), the position
   re-optimised every ``every`` images; the rest of the network in software;
6. ``write_report``: accuracy of hardware, software and noisy software (eq. 4.3 noise, 1000
   passes per image as in thesis 4.9), confusion matrices, hardware vs software MAC and its
   errors on background and image core (Fig. 4.9, 4.10), lab time and instrument operations
   per image for each plan.

The source is calibrated after the chains are designed (not before) because on a virtual lab
the bench it is calibrated on is the one holding the fabricated chains.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

# this module's step ``design_chains`` wraps Algorithm 1, ``calibration.chain.design_chains``
from calibration import chain as chain_cal
from calibration.chain import (
    THESIS_FREQS_HZ,
    ChainDesign,
    VRef,
    place_chain,
    virtual_lab_overrides,
    write_design,
)
from calibration.mac import (
    Convolver,
    Ledger,
    MacResult,
    PlacedChain,
    ToneMap,
    ToneSource,
    fit_v_max,
    measure_source_settling,
    patches_2x2,
)
from calibration.position import Optimisation, generator_one_hot, optimise_z
from calibration.reference import ReferenceMap, SweepPlan, measure_reference_map, rescaled_power
from calibration.source import SourceCalibration, calibrate_source
from hil.bench.lab import REFERENCE_SAMPLE, Lab, LabConfig, load_lab_config, load_reference_map, open_lab
from hil.conv.images import ImageSplit, load_images
from hil.conv.network import ConvNet, confusion_matrix, evaluate, load_model
from hil.conv.report import (
    mac_error_stats,
    plot_confusions,
    plot_convolved,
    plot_lab_time,
    plot_mac_comparison,
    write_report_markdown,
)
from hil.errors import ConfigError, HilError
from hil.plots import plt  # matplotlib itself is imported only when a figure is drawn
from hil.runs import RunFolder
from hil.runs import save_figure as _save_figure

if TYPE_CHECKING:  # the simulator itself is imported only for a virtual lab (_virtual_world)
    from sims.virtual_lab import World

PLANS = ("planned", "algorithm3")
PLAN_TITLES = {"planned": "measurement plan", "algorithm3": "Algorithm 3 as written"}


@dataclass
class DeployConfig:
    """Everything ``deploy`` does is set here (and written to the run folder)."""

    lab: str = "lab_configs/virtual.yaml"
    n_images: int = 100
    plans: list[str] = field(default_factory=lambda: list(PLANS))
    algorithm3_images: int | None = None   # None: as many as n_images
    every: int = 10                        # re-optimise every N images (thesis 4.7)
    n_avg: int = 1                         # RF on/off pairs per chain reading (thesis 4.6.2: 1)
    nplc: float = 5.0                      # ~20 nV rms (thesis Fig. 4.7c)
    eps: float = 2e-3                      # source settled: power within eps of full scale
    place_trials: int = 25                 # Algorithm 2's 25 trials at placement
    reopt_trials: int = 12
    reopt_window_mm: float = 0.012
    reopt_n_avg: int = 4
    vmax_patches: int = 24                 # representative multi-tone patches for V_max
    group_um: float = 3.0
    dz_max_um: float = 100.0
    noisy_repeats: int = 1000
    seed: int = 0
    map_csv: str | None = None             # a reference map (else measured, virtual lab only)
    source_cal: str | None = None          # a source calibration (else measured)
    ports: dict[str, int] | None = None    # chain -> output-switch port (default chain k: k + 1)
    voltmeter_channels: dict[str, int] | None = None   # chain -> voltmeter channel (default 1)

    def check(self) -> None:
        for key in ("n_images", "every", "n_avg", "place_trials", "reopt_trials", "reopt_n_avg",
                    "noisy_repeats"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)!r}")
        if self.vmax_patches < 2:
            raise ConfigError("vmax_patches", f"must be >= 2, got {self.vmax_patches}")
        if self.algorithm3_images is not None and self.algorithm3_images < 1:
            raise ConfigError("algorithm3_images", f"must be >= 1, got {self.algorithm3_images}")
        if not 0 < self.eps < 0.5:
            raise ConfigError("eps", f"must be in (0, 0.5), got {self.eps}")
        if not 0.01 <= self.nplc <= 50:
            raise ConfigError("nplc", f"must be in [0.01, 50], got {self.nplc}")
        if not self.plans or any(p not in PLANS for p in self.plans):
            raise ConfigError("plans", f"choose from {', '.join(PLANS)}, got {self.plans!r}")
        for key, allowed in (("ports", (1, 2, 3)), ("voltmeter_channels", (1, 2))):
            for chain, value in (getattr(self, key) or {}).items():
                if value not in allowed:
                    raise ConfigError(f"{key}.{chain}", f"must be one of {allowed}, got {value!r}")
        if self.group_um < 0:
            raise ConfigError("group_um", f"must be >= 0, got {self.group_um}")


def model_path_of(model: str | Path) -> Path:
    """The model.pt of a run folder (or the file itself); ConfigError if missing."""
    p = Path(model)
    if p.is_dir():
        p = p / "model.pt"
    if not p.exists():
        raise ConfigError("--model", f"{p} does not exist (a run folder of hil conv train, or its model.pt)")
    return p


def dataset_of(model_path: Path, meta: dict[str, Any]) -> tuple[str, str | None]:
    """The dataset a trained conv model was trained on, and its data folder (None: the shipped
    one): from the model's metadata, else from the config.yaml beside it."""
    name = meta.get("dataset")
    data_dir = meta.get("data_dir")
    cfg = model_path.parent / "config.yaml"
    if name is None and cfg.exists():
        c = yaml.safe_load(cfg.read_text()) or {}
        name, data_dir = c.get("dataset"), c.get("data_dir")
    return str(name or "digits"), data_dir


def _say(progress: bool) -> Callable[..., None]:
    """``print`` when showing progress, else a function that says nothing."""
    return print if progress else (lambda *a, **k: None)


def reference_plan() -> SweepPlan:
    """The reference-map sweep of a virtual deploy: the three reference devices on switch
    ports 1-3, stage z 17.5-22.5 mm every 0.25 mm, 1-5 GHz every 50 MHz, 16 dBm."""
    return SweepPlan(devices={"ref0": 1, "ref1": 2, "ref2": 3},
                     stage_z_mm=np.round(np.arange(17.5, 22.51, 0.25), 4).tolist(),
                     freq_hz=np.arange(1.0e9, 5.0001e9, 50e6).tolist(), power_dbm=16.0)


# --------------------------------------------------------------------------- the steps


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class TrainedNetwork:
    """What is deployed: the network of ``hil conv train``, its kernels (one chain each), the
    tone frequency of each kernel input, and the first ``n_images`` test images."""

    model_path: Path
    net: ConvNet
    meta: dict[str, Any]
    dataset: str
    split: ImageSplit
    x: torch.Tensor          # (n_images, 1, H, W): the test images inferred on
    labels: np.ndarray       # (n_images,)
    kernels: np.ndarray      # (n_kernels, 4)
    freq_hz: tuple[float, ...]

    @property
    def n_images(self) -> int:
        return len(self.labels)

    @property
    def noise(self) -> float:
        """The training's multiplicative MAC noise (eq. 4.3), for the noisy software accuracy."""
        return float(self.meta.get("noise", 0.5))


def load_network(model: str | Path, n_images: int) -> TrainedNetwork:
    """The network of a ``hil conv train`` run folder (or its model.pt) in eval mode, and its
    dataset's first ``n_images`` test images (fewer if the test set is smaller); a file that is
    not such a model is a HilError naming it."""
    model_path = model_path_of(model)
    try:
        net, meta = load_model(model_path)
    except Exception as exc:  # a truncated or foreign file: say which, no traceback
        raise HilError(f"{model_path}: not a model of hil conv train ({exc})") from exc
    net.eval()
    dataset, data_dir = dataset_of(model_path, meta)
    split = load_images(dataset, data_dir)
    n = min(n_images, len(split.x_test))
    kernels_json = model_path.parent / "kernels.json"
    freqs = [float(f) for f in json.loads(kernels_json.read_text())["freq_hz"]] \
        if kernels_json.exists() else list(THESIS_FREQS_HZ)
    return TrainedNetwork(model_path=model_path, net=net, meta=meta, dataset=dataset, split=split,
                          x=split.x_test[:n], labels=split.y_test[:n].numpy(), kernels=net.kernels(),
                          freq_hz=tuple(freqs))


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class ReferenceStep:
    """Step 1: the reference-diode map (thesis 3.5.1) with its Kittel fit, the interpolated
    reference voltage ``v_ref(freq_hz, z_um)`` and the fit of the power rescaling."""

    map_csv: Path
    reference_map: ReferenceMap
    v_ref: VRef
    power_fit: dict[str, float]

    def rescale(self, freq_hz: np.ndarray) -> np.ndarray:
        """The relative input power at ``freq_hz`` that gives a frequency-independent
        reference response (``calibration.reference.rescaled_power`` with P0 = 1)."""
        return rescaled_power(freq_hz, self.power_fit, 1.0)


def _virtual_world(lab_cfg: LabConfig, overrides: dict[str, Any]) -> World:
    """The virtual lab's world (its file and seed) with ``overrides`` merged over the lab's own."""
    # local: the simulator (~0.7 s of scipy.signal) is needed on a virtual lab only
    from sims.virtual_lab import World
    from sims.virtual_lab.config import deep_merge

    if lab_cfg.virtual is None:
        raise ConfigError("lab", f"{lab_cfg.name}: not a virtual lab (no virtual_lab section)")
    return World.from_file(lab_cfg.virtual.world, seed=lab_cfg.virtual.seed,
                           overrides=deep_merge(dict(lab_cfg.virtual.overrides), overrides))


def _measure_map(lab_cfg: LabConfig, run: RunFolder, say: Callable[..., None]) -> Path:
    """The reference map on the virtual lab's reference sample (a separate chip, thesis 3.5.1)."""
    if lab_cfg.virtual is None:
        raise ConfigError("--map", "a real bench needs a measured reference map (hil calibrate reference)")
    world = _virtual_world(lab_cfg, REFERENCE_SAMPLE)
    plan = reference_plan()
    path = run.file("reference_map.csv")
    say("reference map: 3 reference devices, 21 z x 81 frequencies")
    with open_lab(lab_cfg, world=world) as lab:
        measure_reference_map(lab, plan, path)
    return path


def measure_reference(cfg: DeployConfig, lab_cfg: LabConfig, run: RunFolder, *,
                      progress: bool = True) -> ReferenceStep:
    """Step 1: read ``cfg.map_csv``, or measure the map into ``reference_map.csv`` of ``run``
    (virtual lab only: a real bench needs ``hil calibrate reference`` first); then fit it.
    HilError if the map is incomplete."""
    map_csv = Path(cfg.map_csv) if cfg.map_csv else _measure_map(lab_cfg, run, _say(progress))
    m = load_reference_map(map_csv)
    if not m.complete:
        raise HilError(f"{map_csv}: the reference map is incomplete")
    m.fit_kittel()
    v_ref = m.interpolator()
    return ReferenceStep(map_csv=map_csv, reference_map=m, v_ref=v_ref, power_fit=m.fit_power_rescaling())


@dataclass(frozen=True)
class DesignStep:
    """Step 2: one chain design per kernel (Algorithm 1), and on a virtual lab the world with
    them fabricated (``None`` on a real bench, where the chips are made elsewhere)."""

    designs: tuple[ChainDesign, ...]
    world: World | None

    def by_name(self) -> dict[str, ChainDesign]:
        return {d.name: d for d in self.designs}


def design_chains(cfg: DeployConfig, lab_cfg: LabConfig, network: TrainedNetwork, ref: ReferenceStep,
                  run: RunFolder, *, progress: bool = True) -> DesignStep:
    """Step 2: chain ``k`` carries kernel ``k``, its synapses at the z of resonance of each
    input's frequency; one V_range for all (the reference voltage at 3.1 GHz shared by the
    inputs), |dz| <= ``cfg.dz_max_um``. Writes ``chain_design.json``; on a virtual lab the
    designs become the world's sample."""
    say = _say(progress)
    freqs = list(network.freq_hz)
    fit = ref.power_fit
    weights = {f"chain{k}": network.kernels[k].tolist() for k in range(len(network.kernels))}
    z_um = 1e3 * ref.reference_map.z_for_resonance_mm(np.asarray(freqs))
    v_range = (fit["slope_v_per_hz"] * 3.1e9 + fit["intercept_v"]) / len(freqs)
    designs = chain_cal.design_chains(ref.v_ref, ref.rescale, z_um, freqs, weights, v_range_v=v_range,
                                      dz_max_um=cfg.dz_max_um)
    write_design(run.file("chain_design.json"), designs,
                 {"model": str(network.model_path), "reference_map": str(ref.map_csv)})
    for d in designs:
        say(f"{d.name}: dz {d.dz_um} um, kernel {np.round(d.target_w, 4).tolist()}, "
            f"predicted {np.round(d.predicted_w, 4).tolist()}")
    world = _virtual_world(lab_cfg, virtual_lab_overrides(designs)) if lab_cfg.virtual is not None else None
    return DesignStep(designs=tuple(designs), world=world)


def open_bench(lab_cfg: LabConfig, design: DesignStep) -> Lab:
    """The bench the chains are used on (the fabricated world on a virtual lab); use it in a
    ``with`` block: leaving it, also on an error, makes every instrument safe (RF off)."""
    return open_lab(lab_cfg, world=design.world, record_to=None)


@dataclass(frozen=True)
class SourceStep:
    """Step 3: the multi-channel source calibration, its settling (worst-channel time constant
    ``tau_s``), and the tones: input i on channel i + 1 at ``freq_hz[i]``, x = 1 at
    ``p_x1_mw[i]``. ``lab_start_s``: the lab clock when the bench session began."""

    calibration: SourceCalibration
    settling: tuple[dict[str, Any], ...]
    tau_s: float
    tones: ToneMap
    lab_start_s: float

    @property
    def p_x1_mw(self) -> np.ndarray:
        return np.asarray(self.tones.p_x1_mw)

    def summary(self) -> dict[str, Any]:
        """The ``source`` entry of ``results.json``."""
        return {"tau_s": self.tau_s, "p_x1_mw": self.tones.p_x1_mw,
                "settling": [{k: s[k] for k in ("channel", "tau_s", "log_residual")}
                             for s in self.settling]}


def calibrate_sources(lab: Lab, cfg: DeployConfig, network: TrainedNetwork, ref: ReferenceStep,
                      run: RunFolder, *, progress: bool = True) -> SourceStep:
    """Step 3, the first at the bench: write ``instruments.json``, set the voltmeter's
    integration (``cfg.nplc``, for every later reading), load ``cfg.source_cal`` or calibrate
    the source (written to ``source_calibration.json``), measure each channel's settling (the
    time constant is unknown before it is measured; thesis bench: ~30 ms), fit the tones."""
    say = _say(progress)
    lab_start_s = float(lab.clock.now_s())  # a real bench's clock does not start at zero
    run.write_json("instruments.json", lab.identities())
    lab["voltmeter"].configure_voltage(nplc=cfg.nplc)
    freqs = list(network.freq_hz)
    if cfg.source_cal:
        cal = SourceCalibration.load(cfg.source_cal)
    else:
        say("source calibration (4 channels)")
        cal = calibrate_source(lab, {i + 1: f for i, f in enumerate(freqs)})
        cal.save(run.file("source_calibration.json"))
    settling = [measure_source_settling(lab, cal, ch) for ch in sorted(cal.channels)]
    tau_s = max(s["tau_s"] for s in settling)
    say(f"source settling time constant {tau_s:.3f} s (worst channel)")
    tones = ToneMap.fit(cal, [i + 1 for i in range(len(freqs))], freqs, ref.rescale(np.asarray(freqs)))
    return SourceStep(calibration=cal, settling=tuple(settling), tau_s=tau_s, tones=tones,
                      lab_start_s=lab_start_s)


def align_chain(lab: Lab, cfg: DeployConfig, design: ChainDesign, src: SourceStep, port: int,
                channel: int, z_mm: float, window_mm: float, n_trials: int, seed: int) -> Optimisation:
    """Algorithm 2 for one chain: Optuna over z in ``z_mm`` +- ``window_mm``, single generator
    tones at the x = 1 powers, read on the chain's voltmeter channel; the stage is left at the
    best z."""
    p1 = src.p_x1_mw
    lab["voltmeter"].channel = channel
    return optimise_z(lab, design, generator_one_hot(port, design.freq_hz, n_avg=cfg.reopt_n_avg),
                      np.diag(p1), p1, z_mm - window_mm, z_mm + window_mm, n_trials=n_trials, seed=seed)


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class PlacementStep:
    """Step 4: every chain at its operating point (port, stage z, V_max, voltmeter channel),
    and the representative multi-tone patches V_max is fitted on at each re-optimisation."""

    chains: tuple[PlacedChain, ...]
    calibration_patches: np.ndarray  # (vmax_patches, 4) inputs in [0, 1]

    def summary(self) -> dict[str, Any]:
        """The ``placement`` entry of ``results.json``."""
        return {c.name: {"stage_z_mm": c.stage_z_mm, "port": c.port,
                         "voltmeter_channel": c.voltmeter_channel} for c in self.chains}


def place_chains(lab: Lab, cfg: DeployConfig, network: TrainedNetwork, ref: ReferenceStep,
                 design: DesignStep, src: SourceStep, *, progress: bool = True) -> PlacementStep:
    """Step 4: chain ``k`` on switch port ``k + 1`` and voltmeter channel 1 unless ``cfg.ports``
    / ``cfg.voltmeter_channels`` say otherwise (ConfigError for a chain that does not exist);
    each located from a frequency sweep (``calibration.chain.place_chain``), then Algorithm 2
    (``cfg.place_trials`` trials within 30 um). The V_max patches: ``cfg.vmax_patches`` distinct
    non-zero 2x2 patches of the training images, drawn with ``cfg.seed``."""
    say = _say(progress)
    by_name = design.by_name()
    ports, channels = cfg.ports or {}, cfg.voltmeter_channels or {}
    unknown = (set(ports) | set(channels)) - set(by_name)
    if unknown:
        raise ConfigError("ports", f"no chain called {', '.join(sorted(unknown))}; chains: "
                          f"{', '.join(by_name)}")
    p1 = src.p_x1_mw
    chains = []
    for k, d in enumerate(design.designs):
        port, channel = ports.get(d.name, k + 1), channels.get(d.name, 1)
        lab["voltmeter"].channel = channel
        placed = place_chain(lab, port, d, ref.v_ref, ref.rescale, float(p1.max()), stage_ref_mm=20.0,
                             fine_span_mm=0.0, progress=say)
        opt = align_chain(lab, cfg, d, src, port, channel, placed["stage_z_mm"], 0.03, cfg.place_trials,
                          cfg.seed)
        say(f"{d.name}: stage z {opt.stage_z_mm:.4f} mm (M {opt.m:.4f})")
        chains.append(PlacedChain(d.name, port, d.target_w, opt.stage_z_mm, opt.v_max_v, channel))
    rng = np.random.default_rng(cfg.seed)
    train_p = patches_2x2(network.split.x_train[:, 0].numpy()).reshape(-1, len(network.freq_hz))
    train_p = np.unique(train_p[train_p.sum(axis=1) > 0], axis=0)
    pick = rng.choice(len(train_p), size=min(cfg.vmax_patches, len(train_p)), replace=False)
    return PlacementStep(chains=tuple(chains), calibration_patches=train_p[pick])


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class InferenceResult:
    """Step 5: the software and noisy-software accuracies, each plan's results (the ``plans``
    entry of ``results.json``), the confusion matrices, and the bench time of the session."""

    software: dict[str, Any]
    plans: dict[str, dict[str, Any]]
    confusions: dict[str, np.ndarray]
    lab_time_total_s: float


def run_inference(lab: Lab, cfg: DeployConfig, network: TrainedNetwork, design: DesignStep,
                  src: SourceStep, placement: PlacementStep, run: RunFolder, *,
                  progress: bool = True) -> InferenceResult:
    """Step 5: the software network (clean, and noisy: ``cfg.noisy_repeats`` passes per image),
    then each plan of ``cfg.plans`` on the bench from the placed chains (each plan starts from
    a copy of them). Writes per plan ``metrics.jsonl`` records (one per image, at once),
    ``mac_<plan>.npz`` and the figures ``mac_``, ``convolved_`` and ``positions_<plan>.png``."""
    net, x, y = network.net, network.x, network.labels
    with torch.no_grad():
        mac_sw = net.mac(x).numpy()
        sw_pred = net(x).argmax(1).numpy()
    noisy = evaluate(net, x, torch.as_tensor(y), noise=network.noise, repeats=cfg.noisy_repeats,
                     seed=cfg.seed)
    software = {"accuracy": float(np.mean(sw_pred == y)), "noisy_accuracy": float(noisy["accuracy"]),
                "noise": network.noise, "noisy_repeats": cfg.noisy_repeats}
    n_classes = network.split.n_classes
    noisy_conf = np.zeros((n_classes, n_classes))
    for label, votes in zip(y, np.asarray(noisy["votes"], float), strict=True):
        noisy_conf[label] += votes / votes.sum()  # mean over the noisy passes of each image
    confusions = {"software (noisy)": noisy_conf}
    plans: dict[str, Any] = {}
    for plan in cfg.plans:
        plans[plan], confusions[f"hardware ({PLAN_TITLES[plan]})"] = _run_plan(
            lab, cfg, network, design, src, placement, run, plan, mac_sw, sw_pred, progress)
    return InferenceResult(software=software, plans=plans, confusions=confusions,
                           lab_time_total_s=lab.clock.now_s() - src.lab_start_s)


def _run_plan(lab: Lab, cfg: DeployConfig, network: TrainedNetwork, design: DesignStep, src: SourceStep,
              placement: PlacementStep, run: RunFolder, plan: str, mac_sw: np.ndarray,
              sw_pred: np.ndarray, progress: bool) -> tuple[dict[str, Any], np.ndarray]:
    """Inference with one measurement plan: its entry of ``results.json`` and confusion matrix."""
    say = _say(progress)
    net, x, y = network.net, network.x, network.labels
    n = network.n_images
    count = n if plan == "planned" or cfg.algorithm3_images is None else min(n, cfg.algorithm3_images)
    by_name = design.by_name()
    ledger = Ledger(lab.clock.now_s)
    source = ToneSource(lab, src.calibration, src.tones, ledger, tau_s=src.tau_s, eps=cfg.eps)
    conv = Convolver(lab, source, [PlacedChain(**asdict(c)) for c in placement.chains], ledger, plan=plan,
                     n_avg=cfg.n_avg, every=cfg.every, group_um=cfg.group_um)
    history: list[dict[str, Any]] = []

    def reoptimise(lab: Any, chains: list[PlacedChain], ledger: Ledger) -> None:
        """Algorithm 2 again around each chain's z, then V_max on the representative patches."""
        for c in chains:
            opt = align_chain(lab, cfg, by_name[c.name], src, c.port, c.voltmeter_channel, c.stage_z_mm,
                              cfg.reopt_window_mm, cfg.reopt_trials, cfg.seed + len(history))
            c.stage_z_mm = opt.stage_z_mm
            ledger.count("stage moves", 2 * (len(opt.trials) + 1))
        v_max = fit_v_max(conv, placement.calibration_patches)
        history.append({"lab_time_s": lab.clock.now_s(),
                        "z_mm": {c.name: c.stage_z_mm for c in chains}, "v_max_v": v_max})

    conv.reoptimise = reoptimise
    bar = _bar(count, f"{PLAN_TITLES[plan]}") if progress else None
    conv.progress = (lambda done, total: bar.update(done - bar.n)) if bar is not None else None
    images = x[:count, 0].numpy()

    def save(idx: range, mac: np.ndarray, volts: np.ndarray) -> None:
        """Each finished image goes to metrics.jsonl at once (a crash loses nothing done)."""
        with torch.no_grad():
            pred = net.head(torch.as_tensor(mac, dtype=torch.float32)).argmax(1).numpy()
        for j, i in enumerate(idx):
            run.append_metrics({"plan": plan, "image": i, "label": int(y[i]),
                                "hardware": int(pred[j]), "software": int(sw_pred[i]),
                                "lab_clock_s": lab.clock.now_s(),
                                "volts": volts[j].round(12).tolist()})

    try:
        res = conv.run(images, on_done=save)
    finally:
        if bar is not None:
            bar.close()
    with torch.no_grad():
        hw_pred = net.head(torch.as_tensor(res.mac, dtype=torch.float32)).argmax(1).numpy()
    np.savez_compressed(run.file(f"mac_{plan}.npz"), mac_hw=res.mac, volts=res.volts,
                        measured=res.measured, mac_sw=mac_sw[:count], labels=y[:count])
    ledger_data = res.ledger
    reopt_s = ledger_data["time_s"].get("re-optimisation", 0.0)
    total_s = float(sum(ledger_data["time_s"].values()))
    result = {
        "images": count, "accuracy": float(np.mean(hw_pred == y[:count])),
        "software_accuracy_same_images": float(np.mean(sw_pred[:count] == y[:count])),
        "lab_s_per_image": total_s / count,
        "lab_s_per_image_without_reoptimisation": (total_s - reopt_s) / count,
        "time_s_per_image": {k: v / count for k, v in ledger_data["time_s"].items()},
        "ops_per_image": {k: v / count for k, v in ledger_data["ops"].items()},
        "clipped_inputs": source.clipped, "reoptimisations": history,
    }
    confusion = confusion_matrix(y[:count], hw_pred, network.split.n_classes)
    say(f"{PLAN_TITLES[plan]}: hardware accuracy {100 * result['accuracy']:.1f} % on {count} "
        f"images, lab time {result['lab_s_per_image']:.0f} s per image")
    result["mac_stats"] = _mac_report(res, mac_sw[:count], x[:count, 0].numpy(), run, plan)
    _plot_positions(history, cfg.every, run.file(f"positions_{plan}.png"), PLAN_TITLES[plan])
    return result, confusion


def write_report(network: TrainedNetwork, src: SourceStep, placement: PlacementStep,
                 inference: InferenceResult, run: RunFolder) -> dict[str, Any]:
    """Step 6: the results (with the plans' speed-up when both ran), ``confusion.png``,
    ``lab_time.png``, ``results.json`` and ``report.md``; returns the results."""
    plans = inference.plans
    results: dict[str, Any] = {"dataset": network.dataset, "n_images": network.n_images,
                               "model": str(network.model_path), "source": src.summary(),
                               "placement": placement.summary(), "software": inference.software,
                               "plans": plans, "lab_time_total_s": inference.lab_time_total_s}
    if "planned" in plans and "algorithm3" in plans:
        a, b = plans["algorithm3"], plans["planned"]
        results["speedup"] = {"lab_time": a["lab_s_per_image"] / b["lab_s_per_image"],
                              "lab_time_without_reoptimisation": a["lab_s_per_image_without_reoptimisation"]
                              / b["lab_s_per_image_without_reoptimisation"],
                              "instrument_operations": sum(_instrument_ops(a).values())
                              / max(1e-9, sum(_instrument_ops(b).values()))}
    _figures(results, inference.confusions, network.split, run)
    run.write_json("results.json", results)
    _markdown(results, run)
    return results


def deploy(model: str | Path, cfg: DeployConfig, run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    """Run the whole procedure (module doc); returns the results written to ``results.json``."""
    cfg.check()
    network = load_network(model, cfg.n_images)
    run.write_config({"model": str(network.model_path), "dataset": network.dataset, "deploy": asdict(cfg)})
    lab_cfg = load_lab_config(cfg.lab)
    ref = measure_reference(cfg, lab_cfg, run, progress=progress)
    design = design_chains(cfg, lab_cfg, network, ref, run, progress=progress)
    with open_bench(lab_cfg, design) as lab:
        src = calibrate_sources(lab, cfg, network, ref, run, progress=progress)
        placement = place_chains(lab, cfg, network, ref, design, src, progress=progress)
        inference = run_inference(lab, cfg, network, design, src, placement, run, progress=progress)
    return write_report(network, src, placement, inference, run)


# --------------------------------------------------------------------------- report helpers


def _instrument_ops(plan: dict[str, Any]) -> dict[str, float]:
    keep = ("supply commands", "stage moves", "switch changes", "voltmeter readings", "rf gate changes")
    return {k: v for k, v in plan["ops_per_image"].items() if k.split(" (")[0] in keep}


def _bar(total: int, what: str) -> Any:
    return tqdm(total=total, desc=what, unit="image", dynamic_ncols=True)


def _mac_report(res: MacResult, mac_sw: np.ndarray, images: np.ndarray, run: RunFolder, plan: str
                ) -> dict[str, Any]:
    """Fig. 4.9 / 4.10 c-e: background = patches whose four pixels are all zero."""
    background = patches_2x2(images).sum(axis=-1) == 0
    stats = mac_error_stats(res.mac, mac_sw, background)
    plot_mac_comparison(res.mac, mac_sw, background, run.file(f"mac_{plan}.png"))
    plot_convolved(images[0], mac_sw[0], res.mac[0], run.file(f"convolved_{plan}.png"))
    return stats


def _plot_positions(history: list[dict[str, Any]], every: int, path: Path, title: str) -> None:
    """Thesis Fig. 4.8 b-c: each chain's optimal z and V_max at every re-optimisation."""
    if not history:
        return
    images = [every * i for i in range(len(history))]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name in history[0]["z_mm"]:
        z = np.array([h["z_mm"][name] for h in history])
        a.plot(images, 1e3 * (z - z[0]), "o-", label=name)
        b.plot(images, [1e6 * h["v_max_v"][name] for h in history], "o-", label=name)
    a.set(ylabel="optimal z - first (um)", title=f"position optimisation, {title}")
    b.set(ylabel="V_max (uV per unit weight)", xlabel="image")
    a.legend()
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)
    plt.close(fig)


def _figures(results: dict[str, Any], confusions: dict[str, np.ndarray], split: Any, run: RunFolder) -> None:
    acc = {"software (noisy)": results["software"]["noisy_accuracy"]}
    for plan, p in results["plans"].items():
        acc[f"hardware ({PLAN_TITLES[plan]})"] = p["accuracy"]
    plot_confusions(confusions, run.file("confusion.png"), list(split.class_names), accuracies=acc)
    plot_lab_time({PLAN_TITLES[k]: v["time_s_per_image"] for k, v in results["plans"].items()},
                  run.file("lab_time.png"))


def _markdown(results: dict[str, Any], run: RunFolder) -> None:
    sw = results["software"]
    acc = {"software": sw["accuracy"], "software (noisy)": sw["noisy_accuracy"]}
    for plan, p in results["plans"].items():
        acc[f"hardware, {PLAN_TITLES[plan]} ({p['images']} images)"] = p["accuracy"]
    sections: dict[str, Any] = {
        "Accuracy on the first test images": acc,
        "Lab time per image (s)": {PLAN_TITLES[k]: round(v["lab_s_per_image"], 1)
                                   for k, v in results["plans"].items()},
        "Instrument operations per image": {
            PLAN_TITLES[k]: {o: round(c, 1) for o, c in _instrument_ops(v).items()}
            for k, v in results["plans"].items()},
    }
    sections["MAC error on image cores (RMS of hardware - software, relative to the software RMS)"] = {
        PLAN_TITLES[k]: {name: round(st["core"]["rel_rms"], 3) for name, st in v["mac_stats"].items()
                         if st["core"]["rel_rms"] is not None}
        for k, v in results["plans"].items()}
    if "speedup" in results:
        sections["Measurement plan vs Algorithm 3 as written"] = {k: round(v, 2)
                                                                  for k, v in results["speedup"].items()}
    sections["Files"] = ["results.json", "confusion.png", "lab_time.png", "mac_<plan>.png",
                         "convolved_<plan>.png", "positions_<plan>.png", "mac_<plan>.npz",
                         "chain_design.json", "metrics.jsonl"]
    write_report_markdown(run.file("report.md"), sections,
                          title="Hybrid convolutional network on spin-diode chains")
