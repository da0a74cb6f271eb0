#!/usr/bin/env bash
# Rewrite the README's option and metrics tables from the role and scenario declarations and
# the metrics module.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python - <<'PY'
import pathlib
from splitfed import docs

readme = pathlib.Path("README.md")
text = readme.read_text()
for begin, end, table in ((docs.BEGIN, docs.END, docs.options_table()), (docs.METRICS_BEGIN, docs.METRICS_END, docs.metrics_table())):
    start, stop = text.index(begin), text.index(end) + len(end)
    text = text[:start] + table + text[stop:]
readme.write_text(text)
PY
