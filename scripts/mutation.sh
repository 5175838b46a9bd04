#!/usr/bin/env bash
# Mutation testing with mutmut 3 (a developer tool, not a runtime or CI dependency).
#
#   bash scripts/mutation.sh                          # every module in the default list
#   bash scripts/mutation.sh drivers/base.py          # one or more modules
#
# Each module is mutated on its own, in a fresh `mutants/` work folder (deleted afterwards), with a
# targeted test selection (TESTS_FOR below) so a module takes minutes, not hours. mutmut itself runs
# only the tests that call a mutated function. The counts and the surviving mutants are written to
# the module's section of scripts/mutation-report.md (the explanation written after a survivor is
# kept when the module is run again).
#
# Settings (environment): MUTATION_MAX_CHILDREN (parallel mutants, default 2), MUTATION_TESTS
# (space-separated pytest ids replacing the module's selection, e.g. for a "before" run),
# MUTATION_DEBUG=1 (mutmut's pytest commands and output), MUTATION_REPORT_ONLY=1 (report what a run
# left in mutants/). The C++ kernel is off (HIL_NATIVE=0): none of the mutated modules need it.
# Time per module on this project's 2-core machine (scripts/mutation-report.md has the scores):
# drivers/base.py ~2 min, calibration/reference.py ~13 min, calibration/position.py ~4 min,
# calibration/chain.py ~25 min, calibration/mac.py ~20 min, hil/chip/twin.py ~45 min,
# hil/training/train.py and hil/network/engine.py longer (see the report); the engine runs only
# when named (1779 mutants, ~3 h with one child on a shared machine).
#
# Why a small Python driver instead of plain `mutmut run`: mutmut 3 reads one configuration
# (`[tool.mutmut]` in pyproject.toml) for the whole tree, while each module here needs its own
# paths and tests. The driver loads that configuration and narrows it per module: all four packages
# are copied to mutants/ (so `import hil`, `drivers`, ... resolve to the copy, ahead of the
# editable install), and every file except the module under test is in `do_not_mutate`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import mutmut" 2>/dev/null; then
    .venv/bin/pip install -q "mutmut==3.3.1"
fi

export HIL_NATIVE=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export MUTATION_MAX_CHILDREN="${MUTATION_MAX_CHILDREN:-2}"

.venv/bin/python - "$@" <<'PY'
"""Run mutmut 3 per module and update scripts/mutation-report.md."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# module -> the test files that exercise it (fast ones; the new tests/test_mutation_*.py included)
TESTS_FOR: dict[str, list[str]] = {
    "drivers/base.py": ["tests/test_drivers_base.py", "tests/test_mutation_drivers_base.py"],
    # the virtual-lab sweeps of test_calibration_routines.py cost ~14 s per mutant (45 min for the
    # module on 2 cores): the synthetic-truth tests cover the same functions in about a second
    "calibration/reference.py": ["tests/test_calibration_routines.py::test_rf_is_off_after_an_error",
                                 "tests/test_mutation_calibration_reference.py"],
    # test_calibration_routines.py measures a reference map on the virtual lab (~5 s fixture) and
    # designs / places chains on it (~6-8 s a test): ~30 s a mutant; its two fast tests stay
    "calibration/chain.py": ["tests/test_calibration_routines.py::test_extract_weights_and_table",
                             "tests/test_calibration_routines.py::test_rf_is_off_after_an_error",
                             "tests/test_mutation_calibration_chain.py"],
    # the three calibrations at default noise (test_twin.py, test_twin_presets.py) take ~4 s each;
    # the noiseless and synthetic-truth tests cover the same functions in a fraction of that
    "hil/chip/twin.py": ["tests/test_twin.py::test_logistic_response_solves_the_oscillator_equation",
                         "tests/test_twin.py::test_the_twin_with_the_chips_true_values_reproduces_the_chip",
                         "tests/test_twin.py::test_calibration_is_exact_without_noise",
                         "tests/test_twin.py::test_calibration_needs_states_and_the_oscillator_equation",
                         "tests/test_twin.py::test_program_and_verify_corrects_static_programming_errors",
                         "tests/test_twin.py::test_monitor_recalibrates_only_when_the_chip_has_changed",
                         "tests/test_twin_presets.py::test_calibration_is_exact_on_a_noiseless_chip_at_the_presets_values",
                         "tests/test_mutation_twin.py"],
    # test_safeguards.py (~5 s a test; its BPTT-learns tests and test_train.py's digits and
    # two-neuron tests take minutes) is too slow per mutant: the fast test_train.py tests and
    # the synthetic-truth tests (~7 s) cover the same safeguards
    "hil/training/train.py": ["tests/test_train.py::test_trial_adam_matches_torch_adam",
                              "tests/test_train.py::test_lr_schedule",
                              "tests/test_train.py::test_summary",
                              "tests/test_train.py::test_windows_per_epoch_limits_updates",
                              "tests/test_train.py::test_exact_bptt_windows_start_from_the_series_state",
                              "tests/test_train.py::test_exact_bptt_refuses_the_highpass_filter",
                              "tests/test_train.py::test_sine_square_other_modes",
                              "tests/test_resume.py::test_rng_state_round_trips_through_a_weights_only_file",
                              "tests/test_mutation_train.py"],
    # only test_calibration_routines.py's virtual-lab test (~8 s + the ~5 s map fixture) reaches it
    "calibration/position.py": ["tests/test_mutation_calibration_position.py"],
    # test_mac.py's virtual-lab tests measure a reference map, calibrate the source and place
    # three chains (~14 s fixture + 2-3 s a test): its synthetic tests stay, and the fake-bench
    # tests of test_mutation_calibration_mac.py cover ToneSource, the plans and Convolver
    "calibration/mac.py": ["tests/test_mac.py::test_ledger_books_exclusive_time_and_absorbs_reoptimisation",
                           "tests/test_mac.py::test_patches_match_the_network",
                           "tests/test_mac.py::test_bad_arguments",
                           "tests/test_mac.py::test_a_plan_object_is_used_and_names_map_through_the_registry",
                           "tests/test_mutation_calibration_mac.py"],
    # test_engine.py's full matrix (92 tests, ~16 s) and the real compile of test_native_build.py
    # cost seconds per surviving mutant (1779 mutants): the plain-loop and fake-compiler tests of
    # test_mutation_engine.py cover the same code in ~5 s; the native shape/tile tests stay
    "hil/network/engine.py": [
        "tests/test_mutation_engine.py",
        *(f"tests/test_engine.py::{t}" for t in (
            "test_engine_shapes_against_reference[native-euler-2-7-5-2-3-3]",
            "test_engine_shapes_against_reference[native-expheun-2-7-5-2-3-3]",
            "test_engine_shapes_against_reference[native-euler-2-33-3-1-8-5]",
            "test_engine_shapes_against_reference[native-euler-1-3-3-2-2-20]",
            "test_dense_recurrent_matrix[native-spintronic]", "test_dense_recurrent_matrix[native-ctrnn]",
            "test_native_results_independent_of_threads_and_stacking",
            "test_unused_outputs_need_no_gradient[native]", "test_no_grad_path_equals_training_path[native]",
            "test_native_kernel_flushes_subnormals_and_restores_the_callers_mode")),
        *(f"tests/test_native_build.py::{t}" for t in (
            "test_the_kernel_is_a_real_file_shipped_as_package_data",
            "test_the_constants_of_sims_neurons_come_as_defines_not_prepended_text",
            "test_the_argument_struct_matches_the_librarys", "test_a_mismatched_struct_is_refused_at_load",
            "test_arguments_are_named_and_checked", "test_a_call_names_its_tensors",
            "test_the_cache_key_covers_flags_compiler_and_source", "test_a_failing_compiler_names_file_and_line",
            "test_require_native_raises_instead_of_falling_back", "test_engines_are_a_registry",
            "test_python_gains_are_those_of_sims_neurons", "test_kernel_gain_and_output_are_those_of_sims_neurons",
            "test_kernel_held_drive_step_is_that_of_sims_neurons")),
    ],
}
PACKAGES = ["hil", "drivers", "calibration", "sims"]
REPORT = Path("scripts/mutation-report.md")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout", -11: "segfault", -6: "abort", -9: "timeout"}
#: the mutant crashed the test process: caught, but counted here as not killed (conservative)
CRASH = ("segfault", "abort")


def run_module(module: str) -> dict:
    """Mutate one module in a fresh mutants/ folder (in a child process: mutmut forks and keeps
    global state) and return its counts and survivors."""
    # MUTATION_TESTS (space-separated pytest ids) replaces the selection, e.g. for a "before" run
    selection = os.environ.get("MUTATION_TESTS", "").split() or TESTS_FOR[module]
    tests = [t for t in selection if Path(t.split("::")[0]).exists()]
    meta_path = Path("mutants") / (module + ".meta")
    if os.environ.get("MUTATION_REPORT_ONLY") == "1" and meta_path.exists():
        return summarise(module, tests)  # report the results a run left in mutants/ (no rerun)
    shutil.rmtree("mutants", ignore_errors=True)
    others = sorted(str(p) for pkg in PACKAGES for p in Path(pkg).rglob("*.py") if str(p) != module)
    # mutmut 3.3.1 reads `item._nodeid`, which pytest 8.4+ no longer has (its stats collection
    # fails with AttributeError): give it the public `nodeid`.
    code = f"""
import _pytest.nodes
if not hasattr(_pytest.nodes.Node, "_nodeid"):
    _pytest.nodes.Node._nodeid = property(lambda self: self.nodeid)
import os, mutmut, mutmut.__main__ as mm
cfg = mm.load_config()
cfg.paths_to_mutate = [mm.Path(p) for p in {PACKAGES!r}]
cfg.do_not_mutate = list(cfg.do_not_mutate) + {others!r}
cfg.tests_dir = {tests!r}
cfg.debug = os.environ.get("MUTATION_DEBUG") == "1"
mutmut.config = cfg
mm._run([], max_children={int(os.environ["MUTATION_MAX_CHILDREN"])})
"""
    proc = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True)
    log = proc.stdout + proc.stderr
    if not meta_path.exists():
        sys.exit(f"mutmut produced no results for {module} (exit {proc.returncode}):\n{log[-4000:]}")
    if proc.returncode != 0:
        print(log[-3000:], file=sys.stderr)
    return summarise(module, tests)


def summarise(module: str, tests: list[str]) -> dict:
    """Counts and survivors of the module from mutmut's results in mutants/ (then deleted)."""
    meta_path = Path("mutants") / (module + ".meta")
    exit_codes: dict[str, int | None] = json.loads(meta_path.read_text())["exit_code_by_key"]
    counts: dict[str, int] = {}
    message_counts: dict[str, int] = {}
    survivors = []
    for name, code_ in sorted(exit_codes.items()):
        status = STATUS.get(code_, "not checked" if code_ is None else f"exit {code_}")
        diff = diff_of(module, name)
        counts[status] = counts.get(status, 0) + 1
        if is_message_mutant(diff):
            message_counts[status] = message_counts.get(status, 0) + 1
        if status in ("survived", "no tests", "suspicious", "not checked", *CRASH):
            survivors.append((name, status, diff, is_message_mutant(diff)))
    shutil.rmtree("mutants", ignore_errors=True)
    return {"counts": counts, "message_counts": message_counts, "survivors": survivors, "tests": tests}


_PARSED: dict[str, object] = {}


def diff_of(module: str, name: str) -> str:
    """The changed lines of a mutant (what `mutmut show` prints), as `-old / +new`."""
    from difflib import unified_diff

    import libcst as cst
    import mutmut.__main__ as mm

    if module not in _PARSED:  # parsing the mutated file is the slow part: once per module
        _PARSED.clear()
        _PARSED[module] = mm.read_mutants_module(module)
    tree = _PARSED[module]
    old = cst.Module([mm.read_original_function(tree, name)]).code.strip().split("\n")
    new = cst.Module([mm.read_mutant_function(tree, name)]).code.strip().split("\n")
    lines = [ln for ln in unified_diff(old, new, lineterm="")
             if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return " / ".join(ln.strip() for ln in lines)[:300]


def is_message_mutant(diff: str) -> bool:
    """A mutant that only changes a human-readable message or a logging call: the issue leaves
    these out of the score. Message = only string literals differ and the original one contains
    a space (instrument commands such as "SYST:ERR?" do not, so their mutants are counted)."""
    import io
    import tokenize

    parts = diff.split(" / ")
    old = [p[1:] for p in parts if p.startswith("-")]
    new = [p[1:] for p in parts if p.startswith("+")]
    if any("log." in line for line in old + new):
        return True
    if len(old) != len(new) or not old:
        return False

    def tokens(line: str) -> list[tuple[int, str]]:
        try:
            return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(line).readline)
                    if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER,
                                      tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT)]
        except (tokenize.TokenError, IndentationError, SyntaxError):
            return []

    for a, b in zip(old, new, strict=True):
        ta, tb = tokens(a.strip()), tokens(b.strip())
        if not ta:  # a piece of a statement spread over lines: is the change inside a literal?
            if not inside_text(a, b):
                return False
            continue
        if len(ta) != len(tb):
            return False
        for (kind_a, text_a), (kind_b, text_b) in zip(ta, tb, strict=True):
            if text_a == text_b:
                continue
            if kind_a != tokenize.STRING or kind_b != tokenize.STRING or " " not in text_a:
                return False
    return True


def inside_text(a: str, b: str) -> bool:
    """Whether line ``b`` differs from ``a`` only inside one double-quoted literal of ``a``
    that contains a space (a message, not a command)."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    q = 0
    while q < min(len(a), len(b)) - p and a[-1 - q] == b[-1 - q]:
        q += 1
    if a[:p].count('"') % 2 == 0:
        return False
    start, end = a.rfind('"', 0, p), a.find('"', p)
    return end != -1 and end >= len(a) - q and " " in a[start:end]


def section(module: str, result: dict, notes: dict[str, str]) -> str:
    """The report's section for one module: counts, score, one line per survivor."""
    c, msg = result["counts"], result["message_counts"]
    killed, timeout = c.get("killed", 0), c.get("timeout", 0)
    skipped = c.get("skipped", 0)
    total = sum(c.values())
    not_killed = total - killed - timeout - skipped
    raw = 100.0 * (killed + timeout) / max(1, total - skipped)
    counted = total - skipped - sum(msg.values()) + msg.get("skipped", 0)
    caught = killed + timeout - msg.get("killed", 0) - msg.get("timeout", 0)
    score = 100.0 * caught / max(1, counted)
    out = [f"## `{module}`", "",
           f"Tests: {', '.join(f'`{t}`' for t in result['tests'])}", "",
           "| total | killed | survived | no tests | timeout | skipped | message/logging | raw score "
           "| score without message/logging |",
           "|---|---|---|---|---|---|---|---|---|",
           f"| {total} | {killed} | {c.get('survived', 0) + c.get('suspicious', 0)} | "
           f"{c.get('no tests', 0)} | {timeout} | {skipped} | {sum(msg.values())} | {raw:.1f} % "
           f"| {score:.1f} % ({caught}/{counted}) |", ""]
    if not_killed:
        out += ["Survivors (name: mutation: why):", ""]
        for name, status, diff, message in result["survivors"]:
            why = notes.get(name, "message string or logging (not counted)" if message else
                            "crash: the mutant kills the test process (caught, but counted as not "
                            "killed)" if status in CRASH else "UNEXPLAINED")
            out.append(f"- `{name}` ({status}): `{diff}`: {why}")
        out.append("")
    return "\n".join(out)


def read_notes() -> dict[str, str]:
    """Explanations already in the report (`- `name` (...): `diff`: why`), kept across runs."""
    notes = {}
    if REPORT.exists():
        for m in re.finditer(r"^- `([^`]+)` \([^)]*\): `.*`: (.+)$", REPORT.read_text(), re.M):
            if m.group(2) != "UNEXPLAINED":
                notes[m.group(1)] = m.group(2)
    return notes


def write_section(module: str, text: str) -> None:
    """Replace (or append) the module's section in the report, leaving the others as they are."""
    old = REPORT.read_text() if REPORT.exists() else "# Mutation report\n\n"
    pattern = re.compile(rf"^## `{re.escape(module)}`\n.*?(?=^## `|\Z)", re.M | re.S)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    REPORT.write_text(new)


modules = sys.argv[1:] or list(TESTS_FOR)[:-1]  # the engine only on request (slow tests)
for module in modules:
    if module not in TESTS_FOR:
        sys.exit(f"unknown module {module!r}; known: {', '.join(TESTS_FOR)}")
for module in modules:
    print(f"mutating {module} ...", flush=True)
    result = run_module(module)
    write_section(module, section(module, result, read_notes()))
    print(f"  {result['counts']}", flush=True)
print(f"report: {REPORT}")
PY
