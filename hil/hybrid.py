"""The hybrid hardware-software convolutional network, end to end on a bench (thesis ch. 4).

``deploy`` takes a network trained by ``hil conv train`` and runs the thesis's procedure
(4.8) on a lab, through the drivers only:

1. the reference-diode map (thesis 3.5.1; measured on the virtual lab's reference sample
   unless a map is given) and the multi-channel source calibration (4.5.2), plus the
   source's settling time constant (``calibration.mac.measure_source_settling``);
2. the kernels -> chain designs (Algorithm 1) -> fabrication (on a virtual lab: the design
   becomes the world's sample, with its fabrication errors and a hand-glued placement);
3. placement: each chain located from a frequency sweep, then Algorithm 2 (Optuna over z,
   eq. 4.4) with single tones from the precise generator; V_max from representative
   multi-tone patches through the VCO source (``calibration.mac.fit_v_max``);
4. inference on the first ``n_images`` test images with each measurement plan
   (``calibration.mac``: the planned one and Algorithm 3 as written), the position
   re-optimised every ``every`` images; the rest of the network in software;
5. the report: accuracy of hardware, software and noisy software (eq. 4.3 noise, 1000 passes
   per image as in thesis 4.9), confusion matrices, hardware vs software MAC and its errors on
   background and image core (Fig. 4.9, 4.10), lab time and instrument operations per image
   for each plan.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.errors import ConfigError, HilError
from hil.runs import RunFolder
from hil.runs import save_figure as _save_figure

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


def _dataset_of(model_path: Path, meta: dict[str, Any]) -> tuple[str, str | None]:
    name = meta.get("dataset")
    data_dir = meta.get("data_dir")
    cfg = model_path.parent / "config.yaml"
    if name is None and cfg.exists():
        import yaml

        c = yaml.safe_load(cfg.read_text()) or {}
        name, data_dir = c.get("dataset"), c.get("data_dir")
    return str(name or "digits"), data_dir


def reference_plan() -> Any:
    """The reference-map sweep of a virtual deploy: the three reference devices on switch
    ports 1-3, stage z 17.5-22.5 mm every 0.25 mm, 1-5 GHz every 50 MHz, 16 dBm."""
    from calibration.reference import SweepPlan

    return SweepPlan(devices={"ref0": 1, "ref1": 2, "ref2": 3},
                     stage_z_mm=np.round(np.arange(17.5, 22.51, 0.25), 4).tolist(),
                     freq_hz=np.arange(1.0e9, 5.0001e9, 50e6).tolist(), power_dbm=16.0)


def _measure_map(cfg: DeployConfig, lab_cfg: Any, run: RunFolder, say: Any) -> Path:
    """The reference map on the virtual lab's reference sample (a separate chip, thesis 3.5.1)."""
    from calibration.reference import measure_reference_map
    from hil.lab import REFERENCE_SAMPLE, open_lab
    from sims.virtual_lab import World
    from sims.virtual_lab.config import deep_merge

    if lab_cfg.virtual is None:
        raise ConfigError("--map", "a real bench needs a measured reference map (hil calibrate reference)")
    world = World.from_file(lab_cfg.virtual.world, seed=lab_cfg.virtual.seed,
                            overrides=deep_merge(dict(lab_cfg.virtual.overrides), REFERENCE_SAMPLE))
    plan = reference_plan()
    path = run.file("reference_map.csv")
    say("reference map: 3 reference devices, 21 z x 81 frequencies")
    with open_lab(lab_cfg, world=world) as lab:
        measure_reference_map(lab, plan, path)
    return path


def deploy(model: str | Path, cfg: DeployConfig, run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    """Run the whole procedure (module doc); returns the results written to ``results.json``."""
    from calibration.chain import (
        THESIS_FREQS_HZ,
        design_chains,
        place_chain,
        virtual_lab_overrides,
        write_design,
    )
    from calibration.mac import (
        Convolver,
        Ledger,
        PlacedChain,
        ToneMap,
        ToneSource,
        fit_v_max,
        measure_source_settling,
        patches_2x2,
    )
    from calibration.position import generator_one_hot, optimise_z
    from calibration.reference import rescaled_power
    from calibration.source import SourceCalibration, calibrate_source
    from hil.conv import confusion_matrix, evaluate, load_model
    from hil.images import load_images
    from hil.lab import load_lab_config, open_lab
    from sims.virtual_lab import World
    from sims.virtual_lab.config import deep_merge

    cfg.check()
    say = print if progress else (lambda *a, **k: None)
    model_path = model_path_of(model)
    try:
        net, meta = load_model(model_path)
    except Exception as exc:  # a truncated or foreign file: say which, no traceback
        raise HilError(f"{model_path}: not a model of hil conv train ({exc})") from exc
    net.eval()
    dataset, data_dir = _dataset_of(model_path, meta)
    split = load_images(dataset, data_dir)
    n = min(cfg.n_images, len(split.x_test))
    x = split.x_test[:n]
    y = split.y_test[:n].numpy()
    kernels = net.kernels()
    freqs = [float(f) for f in json.loads((model_path.parent / "kernels.json").read_text())["freq_hz"]] \
        if (model_path.parent / "kernels.json").exists() else list(THESIS_FREQS_HZ)
    run.write_config({"model": str(model_path), "dataset": dataset, "deploy": asdict(cfg)})
    lab_cfg = load_lab_config(cfg.lab)

    # 1. reference map, source calibration
    map_csv = Path(cfg.map_csv) if cfg.map_csv else _measure_map(cfg, lab_cfg, run, say)
    from hil.lab import load_reference_map

    m = load_reference_map(map_csv)
    if not m.complete:
        raise HilError(f"{map_csv}: the reference map is incomplete")
    m.fit_kittel()
    v_ref = m.interpolator()
    fit = m.fit_power_rescaling()

    def rescale(f: np.ndarray) -> np.ndarray:
        return rescaled_power(f, fit, 1.0)

    # 2. chain designs and (virtual) fabrication
    weights = {f"chain{k}": kernels[k].tolist() for k in range(len(kernels))}
    z_um = 1e3 * m.z_for_resonance_mm(np.asarray(freqs))
    v_range = (fit["slope_v_per_hz"] * 3.1e9 + fit["intercept_v"]) / len(freqs)
    designs = design_chains(v_ref, rescale, z_um, freqs, weights, v_range_v=v_range, dz_max_um=cfg.dz_max_um)
    write_design(run.file("chain_design.json"), designs,
                 {"model": str(model_path), "reference_map": str(map_csv)})
    for d in designs:
        say(f"{d.name}: dz {d.dz_um} um, kernel {np.round(d.target_w, 4).tolist()}, "
            f"predicted {np.round(d.predicted_w, 4).tolist()}")
    world = None
    if lab_cfg.virtual is not None:
        world = World.from_file(lab_cfg.virtual.world, seed=lab_cfg.virtual.seed,
                                overrides=deep_merge(dict(lab_cfg.virtual.overrides),
                                                     virtual_lab_overrides(designs)))
    results: dict[str, Any] = {"dataset": dataset, "n_images": n, "model": str(model_path)}
    with open_lab(lab_cfg, world=world, record_to=None) as lab:
        lab_start_s = float(lab.clock.now_s())  # a real bench's clock does not start at zero
        run.write_json("instruments.json", lab.identities())
        lab["voltmeter"].configure_voltage(nplc=cfg.nplc)
        if cfg.source_cal:
            cal = SourceCalibration.load(cfg.source_cal)
        else:
            say("source calibration (4 channels)")
            cal = calibrate_source(lab, {i + 1: f for i, f in enumerate(freqs)})
            cal.save(run.file("source_calibration.json"))
        # the source's time constant is unknown before it is measured (thesis bench: ~30 ms)
        settling = [measure_source_settling(lab, cal, ch) for ch in sorted(cal.channels)]
        tau_s = max(s["tau_s"] for s in settling)
        say(f"source settling time constant {tau_s:.3f} s (worst channel)")
        tones = ToneMap.fit(cal, [i + 1 for i in range(len(freqs))], freqs, rescale(np.asarray(freqs)))
        p1 = np.asarray(tones.p_x1_mw)
        results["source"] = {"tau_s": tau_s, "p_x1_mw": tones.p_x1_mw,
                             "settling": [{k: s[k] for k in ("channel", "tau_s", "log_residual")}
                                          for s in settling]}

        # 3. placement
        chains = []
        by_name = {d.name: d for d in designs}
        ports, channels = cfg.ports or {}, cfg.voltmeter_channels or {}
        unknown = (set(ports) | set(channels)) - set(by_name)
        if unknown:
            raise ConfigError("ports", f"no chain called {', '.join(sorted(unknown))}; chains: "
                              f"{', '.join(by_name)}")

        def align(d: Any, port: int, channel: int, z_mm: float, window_mm: float, n_trials: int,
                  seed: int) -> Any:
            """Algorithm 2 for one chain: Optuna over z in z_mm +- window_mm, single generator
            tones at the x = 1 powers, read on the chain's voltmeter channel."""
            lab["voltmeter"].channel = channel
            return optimise_z(lab, d, generator_one_hot(port, d.freq_hz, n_avg=cfg.reopt_n_avg), np.diag(p1),
                              p1, z_mm - window_mm, z_mm + window_mm, n_trials=n_trials, seed=seed)

        for k, d in enumerate(designs):
            port, channel = ports.get(d.name, k + 1), channels.get(d.name, 1)
            lab["voltmeter"].channel = channel
            placed = place_chain(lab, port, d, v_ref, rescale, float(p1.max()), stage_ref_mm=20.0,
                                 fine_span_mm=0.0, progress=say)
            opt = align(d, port, channel, placed["stage_z_mm"], 0.03, cfg.place_trials, cfg.seed)
            say(f"{d.name}: stage z {opt.stage_z_mm:.4f} mm (M {opt.m:.4f})")
            chains.append(PlacedChain(d.name, port, d.target_w, opt.stage_z_mm, opt.v_max_v, channel))
        results["placement"] = {c.name: {"stage_z_mm": c.stage_z_mm, "port": c.port,
                                         "voltmeter_channel": c.voltmeter_channel} for c in chains}
        rng = np.random.default_rng(cfg.seed)
        train_p = patches_2x2(split.x_train[:, 0].numpy()).reshape(-1, len(freqs))
        train_p = np.unique(train_p[train_p.sum(axis=1) > 0], axis=0)
        pick = rng.choice(len(train_p), size=min(cfg.vmax_patches, len(train_p)), replace=False)
        calib_patches = train_p[pick]

        # 4. inference with each plan
        with torch.no_grad():
            mac_sw = net.mac(x).numpy()
            sw_pred = net(x).argmax(1).numpy()
        noisy = evaluate(net, x, torch.as_tensor(y), noise=float(meta.get("noise", 0.5)),
                         repeats=cfg.noisy_repeats, seed=cfg.seed)
        results["software"] = {"accuracy": float(np.mean(sw_pred == y)),
                               "noisy_accuracy": float(noisy["accuracy"]),
                               "noise": float(meta.get("noise", 0.5)), "noisy_repeats": cfg.noisy_repeats}
        noisy_conf = np.zeros((split.n_classes, split.n_classes))
        for label, votes in zip(y, np.asarray(noisy["votes"], float), strict=True):
            noisy_conf[label] += votes / votes.sum()  # mean over the noisy passes of each image
        confusions = {"software (noisy)": noisy_conf}
        plans: dict[str, Any] = {}
        for plan in cfg.plans:
            count = n if plan == "planned" or cfg.algorithm3_images is None else min(n, cfg.algorithm3_images)
            ledger = Ledger(lab.clock.now_s)
            source = ToneSource(lab, cal, tones, ledger, tau_s=tau_s, eps=cfg.eps)
            conv = Convolver(lab, source, [PlacedChain(**asdict(c)) for c in chains], ledger, plan=plan,
                             n_avg=cfg.n_avg, every=cfg.every, group_um=cfg.group_um)
            history: list[dict[str, Any]] = []

            def reoptimise(lab: Any, chains: list[Any], ledger: Any, conv: Any = conv,
                           history: list[dict[str, Any]] = history) -> None:
                for c in chains:
                    opt = align(by_name[c.name], c.port, c.voltmeter_channel, c.stage_z_mm,
                                cfg.reopt_window_mm, cfg.reopt_trials, cfg.seed + len(history))
                    c.stage_z_mm = opt.stage_z_mm
                    ledger.count("stage moves", 2 * (len(opt.trials) + 1))
                v_max = fit_v_max(conv, calib_patches)
                history.append({"lab_time_s": lab.clock.now_s(),
                                "z_mm": {c.name: c.stage_z_mm for c in chains}, "v_max_v": v_max})

            conv.reoptimise = reoptimise
            bar = _bar(count, f"{PLAN_TITLES[plan]}") if progress else None
            conv.progress = (lambda done, total, bar=bar: bar.update(done - bar.n)) if bar else None
            images = x[:count, 0].numpy()

            def save(idx: range, mac: np.ndarray, volts: np.ndarray, plan: str = plan) -> None:
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
            plans[plan] = {
                "images": count, "accuracy": float(np.mean(hw_pred == y[:count])),
                "software_accuracy_same_images": float(np.mean(sw_pred[:count] == y[:count])),
                "lab_s_per_image": total_s / count,
                "lab_s_per_image_without_reoptimisation": (total_s - reopt_s) / count,
                "time_s_per_image": {k: v / count for k, v in ledger_data["time_s"].items()},
                "ops_per_image": {k: v / count for k, v in ledger_data["ops"].items()},
                "clipped_inputs": source.clipped, "reoptimisations": history,
            }
            confusions[f"hardware ({PLAN_TITLES[plan]})"] = confusion_matrix(y[:count], hw_pred,
                                                                             split.n_classes)
            say(f"{PLAN_TITLES[plan]}: hardware accuracy {100 * plans[plan]['accuracy']:.1f} % on {count} "
                f"images, lab time {plans[plan]['lab_s_per_image']:.0f} s per image")
            plans[plan]["mac_stats"] = _mac_report(res, mac_sw[:count], x[:count, 0].numpy(), run, plan)
            _plot_positions(history, cfg.every, run.file(f"positions_{plan}.png"), PLAN_TITLES[plan])
        results["plans"] = plans
        results["lab_time_total_s"] = lab.clock.now_s() - lab_start_s
    if "planned" in plans and "algorithm3" in plans:
        a, b = plans["algorithm3"], plans["planned"]
        results["speedup"] = {"lab_time": a["lab_s_per_image"] / b["lab_s_per_image"],
                              "lab_time_without_reoptimisation": a["lab_s_per_image_without_reoptimisation"]
                              / b["lab_s_per_image_without_reoptimisation"],
                              "instrument_operations": sum(_instrument_ops(a).values())
                              / max(1e-9, sum(_instrument_ops(b).values()))}
    _figures(results, confusions, split, run)
    run.write_json("results.json", results)
    _markdown(results, run)
    return results


def _instrument_ops(plan: dict[str, Any]) -> dict[str, float]:
    keep = ("supply commands", "stage moves", "switch changes", "voltmeter readings", "rf gate changes")
    return {k: v for k, v in plan["ops_per_image"].items() if k.split(" (")[0] in keep}


def _bar(total: int, what: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="image", dynamic_ncols=True)


def _mac_report(res: Any, mac_sw: np.ndarray, images: np.ndarray, run: RunFolder, plan: str
                ) -> dict[str, Any]:
    """Fig. 4.9 / 4.10 c-e: background = patches whose four pixels are all zero."""
    from calibration.mac import patches_2x2
    from hil.conv_report import mac_error_stats, plot_convolved, plot_mac_comparison

    background = patches_2x2(images).sum(axis=-1) == 0
    stats = mac_error_stats(res.mac, mac_sw, background)
    plot_mac_comparison(res.mac, mac_sw, background, run.file(f"mac_{plan}.png"))
    plot_convolved(images[0], mac_sw[0], res.mac[0], run.file(f"convolved_{plan}.png"))
    return stats


def _plot_positions(history: list[dict[str, Any]], every: int, path: Path, title: str) -> None:
    """Thesis Fig. 4.8 b-c: each chain's optimal z and V_max at every re-optimisation."""
    from hil.plots import plt

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
    from hil.conv_report import plot_confusions, plot_lab_time

    acc = {"software (noisy)": results["software"]["noisy_accuracy"]}
    for plan, p in results["plans"].items():
        acc[f"hardware ({PLAN_TITLES[plan]})"] = p["accuracy"]
    plot_confusions(confusions, run.file("confusion.png"), list(split.class_names), accuracies=acc)
    plot_lab_time({PLAN_TITLES[k]: v["time_s_per_image"] for k, v in results["plans"].items()},
                  run.file("lab_time.png"))


def _markdown(results: dict[str, Any], run: RunFolder) -> None:
    from hil.conv_report import write_report_markdown

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
