#!/bin/sh
# Remove from a virtual environment what nothing reads at run time: the packages' test suites,
# type stubs, and what only builds extensions (C headers, Cython declarations, static
# libraries): the images have no compiler. Usage: prune_venv.sh VENV
set -eu
venv=$1
find "$venv" -depth -type d -name tests -prune -exec rm -rf {} +
find "$venv" -type f \( -name '*.pyi' -o -name '*.h' -o -name '*.pxd' -o -name '*.a' \) -delete
