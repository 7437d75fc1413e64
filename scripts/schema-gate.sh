#!/bin/sh
# The schema gate, run by `make test`: `buf lint` (the STANDARD rules) over proto/, and
# `buf breaking` (the FILE rules) of proto/ against the last release of the schemas.
#
# The release is the git tag named in proto/BASELINE (the one place that names it); its proto/
# tree is taken with `git archive`, so shallow CI clones need only that tag fetched. buf comes
# from npm (@bufbuild/buf ships the binary), installed once into .cache/buf/VERSION and reused.
#
# Usage: scripts/schema-gate.sh [--against DIR]   (DIR: a folder with a buf.yaml and the schemas
# to compare with instead of the tag; the tests use it to show that a breaking change fails).
set -eu
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
cache=".cache/buf/$BUF_VERSION"
buf="$cache/node_modules/.bin/buf"

if [ ! -x "$buf" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "schema-gate: npm is missing, and buf comes from npm (@bufbuild/buf); fix: apt-get install npm" \
             "(scripts/install-system-deps.sh does), then run make test again" >&2
        exit 1
    fi
    echo "schema-gate: installing buf $BUF_VERSION into $cache (once)"
    mkdir -p "$cache"
    if ! npm install --silent --no-audit --no-fund --prefix "$cache" "@bufbuild/buf@$BUF_VERSION" >&2; then
        echo "schema-gate: npm could not install @bufbuild/buf@$BUF_VERSION; fix: check the network or the npm" \
             "registry setting (npm config get registry), then run make test again" >&2
        exit 1
    fi
fi

against=""
if [ "${1:-}" = "--against" ]; then
    against=${2:?"--against needs a directory"}
fi

echo "schema-gate: buf lint (STANDARD)"
if ! "$buf" lint; then
    echo "schema-gate: buf lint failed (above); fix the schema, or see https://buf.build/docs/lint/rules" >&2
    exit 1
fi

scratch=""
if [ -z "$against" ]; then
    tag=$(head -n 1 proto/BASELINE | tr -d "[:space:]")
    if ! git rev-parse -q --verify "refs/tags/$tag^{tag}" >/dev/null 2>&1 \
            && ! git rev-parse -q --verify "refs/tags/$tag" >/dev/null 2>&1; then
        echo "schema-gate: the release tag $tag (named in proto/BASELINE) is not in this clone; fix: git fetch" \
             "origin tag $tag (a shallow clone has no tags)" >&2
        exit 1
    fi
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    git archive "$tag" proto | tar -x -C "$scratch"
    # Its own buf.yaml: the comparison never picks up a configuration from a folder above it.
    printf 'version: v2\nmodules:\n  - path: proto\n' > "$scratch/buf.yaml"
    against="$scratch"
    label="release $tag"
else
    label="$against"
fi

echo "schema-gate: buf breaking against $label (FILE rules)"
if ! "$buf" breaking --against "$against"; then
    echo "schema-gate: the schemas break compatibility with $label (above); fix: only add fields, enum values," \
         "messages and RPCs to a .v1 package (reserve what you remove), or start a .v2 package" >&2
    exit 1
fi
echo "schema-gate: ok"
