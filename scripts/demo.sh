#!/usr/bin/env bash
# Set up (if needed) and run the main job on the simulated default: train the spintronic
# network on sequential digits with the shipped preset, 10 seeds at once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hil train --preset digits --seeds 0-9 "$@"
