#!/bin/sh
# The schema gate, run by `make test`: `buf lint` (the STANDARD rules) over proto/, and
# `buf breaking` (the FILE rules) of proto/ against the last release of the schemas.
#
# The release is the git tag named in proto/BASELINE (the one place that names it). Its schemas
# are committed as a buf image, proto/baseline/TAG.binpb, made once from the tag with
# `scripts/schema-gate.sh --make-baseline`: the gate then needs no git history or tags (CI may
# clone shallow, without tags). buf comes from npm (@bufbuild/buf ships the binary), installed
# once into .cache/buf/VERSION and reused.
#
# Usage: scripts/schema-gate.sh [--against DIR]   (DIR: a folder with a buf.yaml and the schemas
# to compare with instead of the release; the tests use it to show that a breaking change fails)
#        scripts/schema-gate.sh --make-baseline   (write proto/baseline/TAG.binpb from the tag)
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
make_baseline=""
case "${1:-}" in
    --against) against=${2:?"--against needs a directory"} ;;
    --make-baseline) make_baseline=1 ;;
esac
tag=$(head -n 1 proto/BASELINE | tr -d "[:space:]")
image="proto/baseline/$tag.binpb"

if [ -n "$make_baseline" ]; then
    if ! git rev-parse -q --verify "refs/tags/$tag" >/dev/null 2>&1; then
        echo "schema-gate: the release tag $tag (named in proto/BASELINE) is not in this clone; fix: git fetch" \
             "origin tag $tag" >&2
        exit 1
    fi
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    git archive "$tag" proto | tar -x -C "$scratch"
    # Its own buf.yaml: the build never picks up a configuration from a folder above it.
    printf 'version: v2\nmodules:\n  - path: proto\n' > "$scratch/buf.yaml"
    mkdir -p proto/baseline
    (cd "$scratch" && "$OLDPWD/$buf" build -o "$OLDPWD/$image")
    echo "schema-gate: wrote $image from the tag $tag"
    exit 0
fi

echo "schema-gate: buf lint (STANDARD)"
if ! "$buf" lint; then
    echo "schema-gate: buf lint failed (above); fix the schema, or see https://buf.build/docs/lint/rules" >&2
    exit 1
fi

if [ -z "$against" ]; then
    if [ ! -f "$image" ]; then
        echo "schema-gate: $image (the schemas of the release $tag named in proto/BASELINE) is missing; fix:" \
             "scripts/schema-gate.sh --make-baseline in a clone that has the tag, and commit the file" >&2
        exit 1
    fi
    against="$image"
    label="release $tag ($image)"
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
