#!/usr/bin/env bash
# Rewrite the README's option table from the role and scenario declarations.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python - <<'PY'
import pathlib
from splitfed import docs

readme = pathlib.Path("README.md")
text = readme.read_text()
start, end = text.index(docs.BEGIN), text.index(docs.END) + len(docs.END)
readme.write_text(text[:start] + docs.options_table() + text[end:])
PY
