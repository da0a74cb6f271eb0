#!/usr/bin/env bash
# Derive the JSON Schema that splitfed's Grafana dashboards are validated against, offline, from
# Grafana's own published TypeScript types: the `Dashboard` type exported by the npm package
# @grafana/schema (dist/types/veneer/dashboard.types.d.ts over dist/types/raw/dashboard/x/types.gen.d.ts,
# which Grafana generates from its CUE dashboard kind), turned into JSON Schema (draft-07) by
# ts-json-schema-generator. The package ships TypeScript only (no JSON or CUE), hence the generator.
#
# Writes ci/schemas/grafana-dashboard.schema.json (committed; tests/observability/grafana_schema.py
# reads it, so the tests need neither node nor the network).
# Installs what it needs when missing: node and npm from apt, and the pinned npm packages below into
# .tools/grafana-schema/ (git-ignored).
#
# Usage: ci/grafana_schema.sh [generate|check]   (default: generate)
#   generate  write ci/schemas/grafana-dashboard.schema.json
#   check     regenerate into a temporary file and fail if the committed schema differs
#
# Bumping: change the versions below, run `ci/grafana_schema.sh`, run
# `.venv/bin/python -m pytest -q tests/observability`, review the schema diff, commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-generate}
sudo=$([ "$(id -u)" = 0 ] || echo sudo)

grafana_schema_version=13.2.3        # @grafana/schema: Grafana 13.2.3's dashboard types
generator_version=2.10.0             # ts-json-schema-generator
typescript_version=5.9.3             # the compiler the generator runs (it accepts >=5.9 <7)
tools=.tools/grafana-schema
out=ci/schemas/grafana-dashboard.schema.json

case "$what" in
  generate | check) ;;
  *) echo "usage: $0 [generate|check]" >&2; exit 2 ;;
esac

install_node() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "grafana_schema: installing nodejs and npm"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q nodejs npm
  fi
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 18 ]; then
    echo "grafana_schema: node $(node --version) is too old; 18 or newer is needed" >&2
    exit 1
  fi
}

installed_version() {  # the version of npm package $1 in $tools, or nothing
  node -p "require('./$tools/node_modules/$1/package.json').version" 2>/dev/null || true
}

install_packages() {
  if [ "$(installed_version @grafana/schema)" = "$grafana_schema_version" ] &&
     [ "$(installed_version ts-json-schema-generator)" = "$generator_version" ] &&
     [ "$(installed_version typescript)" = "$typescript_version" ]; then
    return
  fi
  echo "grafana_schema: installing @grafana/schema@$grafana_schema_version," \
    "ts-json-schema-generator@$generator_version and typescript@$typescript_version into $tools"
  mkdir -p "$tools"
  echo '{"name": "splitfed-grafana-schema", "private": true}' >"$tools/package.json"
  # The packages declare node >=22 but run on Debian's node 18 and 20 (engines are advisory).
  npm install --prefix "$tools" --no-audit --no-fund --no-package-lock --save-exact \
    --loglevel=error \
    "@grafana/schema@$grafana_schema_version" \
    "ts-json-schema-generator@$generator_version" \
    "typescript@$typescript_version"
}

# The types handed to the generator. Everything comes from @grafana/schema; the only changes are
# the two loosenings documented in the schema's $comment (library panel instances, annotation targets).
write_sources() {
  cat >"$tools/entry.ts" <<'EOF'
import type {
  AnnotationContainer, AnnotationQuery, AnnotationTarget, Dashboard, DataQuery,
  LibraryPanelRef, Panel, RowPanel,
} from '@grafana/schema';

export type GrafanaPanel = Panel;
export type GrafanaRowPanel = RowPanel;
// A library panel instance: Grafana saves it as {id, gridPos, title?, libraryPanel: {uid, name}}, without `type`.
// (Line comments here: JSDoc comments would end up as descriptions in the schema.)
export interface GrafanaLibraryPanel extends Omit<Panel, 'type' | 'libraryPanel'> {
  type?: string;
  libraryPanel: LibraryPanelRef;
}
// The veneer types `target` as a DataQuery (refId required); the raw kind as AnnotationTarget. Either is accepted.
export interface GrafanaAnnotationQuery extends Omit<AnnotationQuery, 'target'> {
  target?: DataQuery | AnnotationTarget;
}
export interface GrafanaDashboard extends Omit<Dashboard, 'annotations' | 'panels'> {
  annotations?: Omit<AnnotationContainer, 'list'> & { list?: GrafanaAnnotationQuery[] };
  panels?: Array<GrafanaPanel | GrafanaRowPanel | GrafanaLibraryPanel>;
}
EOF
  cat >"$tools/tsconfig.json" <<'EOF'
{
  "compilerOptions": {
    "module": "nodenext", "moduleResolution": "nodenext", "target": "es2022",
    "strict": true, "skipLibCheck": true, "noEmit": true
  },
  "files": ["entry.ts"]
}
EOF
  # Put the three panel shapes in `definitions` and choose between them by `type` and `libraryPanel`
  # (if/then/else) rather than the generator's anyOf, so that an error names the field at fault
  # instead of "not valid under any of the given schemas".
  cat >"$tools/assemble.cjs" <<'EOF'
const fs = require('fs');
const { isDeepStrictEqual } = require('util');
const [dir, out, pkgVersion, genVersion, tsVersion] = process.argv.slice(2);
const load = (name) => {
  const s = JSON.parse(fs.readFileSync(`${dir}/${name}.json`, 'utf8'));
  delete s.$schema;
  if (s.definitions && Object.keys(s.definitions).length === 0) delete s.definitions;
  return s;
};
const dashboard = load('GrafanaDashboard');
const shapes = { Panel: load('GrafanaPanel'), RowPanel: load('GrafanaRowPanel'), LibraryPanel: load('GrafanaLibraryPanel') };
const fail = (msg) => { console.error(`grafana_schema: ${msg}; @grafana/schema changed shape, update ci/grafana_schema.sh`); process.exit(1); };

const branches = dashboard.properties?.panels?.items?.anyOf;
if (!Array.isArray(branches) || branches.length !== 3) fail('Dashboard.panels is not a union of three panel types');
for (const [name, shape] of Object.entries(shapes)) {
  if (!branches.some((b) => isDeepStrictEqual(b, shape))) fail(`Dashboard.panels has no branch equal to ${name}`);
}
if (!isDeepStrictEqual(shapes.RowPanel.properties?.panels?.items, shapes.Panel)) fail('RowPanel.panels is not Panel[]');
if (shapes.RowPanel.properties.type?.const !== 'row') fail('RowPanel.type is not the constant "row"');

const panelOrLibrary = {
  if: { required: ['libraryPanel'] },
  then: { $ref: '#/definitions/LibraryPanel' },
  else: { $ref: '#/definitions/Panel' },
};
dashboard.properties.panels.items = {
  if: { required: ['type'], properties: { type: { const: 'row' } } },
  then: { $ref: '#/definitions/RowPanel' },
  else: panelOrLibrary,
};
shapes.RowPanel.properties.panels.items = panelOrLibrary;

const { $schema, ...rest } = JSON.parse(fs.readFileSync(`${dir}/GrafanaDashboard.json`, 'utf8'));
const schema = {
  $schema,
  $comment:
    `Generated by ci/grafana_schema.sh from the npm package @grafana/schema@${pkgVersion} ` +
    `(type Dashboard, dist/types/veneer/dashboard.types.d.ts) with ts-json-schema-generator@${genVersion} ` +
    `and typescript@${tsVersion}; do not edit by hand, rerun the script. ` +
    'Required fields and value types are those of the TypeScript types. Extra properties are allowed ' +
    'everywhere (TypeScript object types are open, and Grafana keeps fields the types do not list). ' +
    'Changes from the types: dashboard panels are chosen by type ("row" -> RowPanel) and by ' +
    '`libraryPanel` (-> LibraryPanel: a Panel whose `type` may be left out, as Grafana saves library ' +
    'panel instances), also inside rows; an annotation `target` may be a DataQuery (veneer type) or an ' +
    'AnnotationTarget (raw dashboard kind type).',
  title: `Grafana dashboard (@grafana/schema ${pkgVersion})`,
  ...dashboard,
  definitions: shapes,
};
fs.writeFileSync(out, JSON.stringify(schema, null, 2) + '\n');
EOF
}

generate() {  # generate FILE
  local tmp type
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"; trap - RETURN' RETURN
  # `--expose none` inlines every type: @grafana/schema has two different interfaces named
  # DataSourceRef (common and dashboard), which the generator refuses to put side by side in
  # `definitions`. `--additional-properties` keeps objects open, as TypeScript's are.
  for type in GrafanaDashboard GrafanaPanel GrafanaRowPanel GrafanaLibraryPanel; do
    node "$tools/node_modules/ts-json-schema-generator/bin/ts-json-schema-generator.js" \
      --tsconfig "$tools/tsconfig.json" --path "$tools/entry.ts" --type "$type" \
      --expose none --no-top-ref --additional-properties --out "$tmp/$type.json"
  done
  node "$tools/assemble.cjs" "$tmp" "$1" \
    "$grafana_schema_version" "$generator_version" "$typescript_version"
}

install_node
install_packages
write_sources
if [ "$what" = check ]; then
  fresh=$(mktemp)
  trap 'rm -f "$fresh"' EXIT
  generate "$fresh"
  if ! cmp -s "$fresh" "$out"; then
    diff -u "$out" "$fresh" | head -40 >&2 || true
    echo "grafana_schema: $out is out of date; run ci/grafana_schema.sh" >&2
    exit 1
  fi
  echo "grafana_schema: $out is up to date"
else
  mkdir -p "$(dirname "$out")"
  generate "$out"
  echo "grafana_schema: wrote $out ($(wc -c <"$out") bytes)"
fi
