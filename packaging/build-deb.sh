#!/usr/bin/env bash
# build-deb.sh: build deploybus-agent and deploybus-server .debs from this
# tree, offline, into packaging/dist/ (packaging/README.md).
#
#   packaging/build-deb.sh [--out DIR] [--agent-only]
#
# Environment:
#   DEB_VERSION          package version (default: deploybus.__version__ + "-1")
#   WHEELHOUSE           pinned dependency wheels (default packaging/wheelhouse,
#                        filled by `make wheelhouse` from packaging/requirements.txt)
#   PYTHON               python with pip, setuptools and wheel, to build the
#                        deploybus wheel (default .venv/bin/python)
#   SOURCE_DATE_EPOCH    default: the time of the last commit (git), so two
#                        builds of one commit make the same files
#
# The tree is copied (git's file list: tracked and untracked-but-not-ignored
# files, so a build never sees .venv, caches or stray build output) to a
# temporary directory and built there with dpkg-buildpackage; the tree
# itself is not written to, except the output directory.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/packaging/dist
PROFILES=
while (($#)); do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        --agent-only) PROFILES=pkg.deploybus.agent-only; shift ;;
        *) echo "usage: $0 [--out DIR] [--agent-only]" >&2; exit 2 ;;
    esac
done
WHEELHOUSE=${WHEELHOUSE:-$ROOT/packaging/wheelhouse}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

die() { echo "build-deb: $*" >&2; exit 1; }

for tool in dpkg-buildpackage dh dh_virtualenv fakeroot; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install dpkg-dev debhelper dh-virtualenv fakeroot build-essential (scripts/setup-brokers.sh installs them)"
done
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || die "Debian's python3 cannot make a venv: apt-get install python3-venv"
[[ -x $PYTHON ]] || die "$PYTHON not found: make install"
ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1 || die "no wheels in $WHEELHOUSE: make wheelhouse"

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/deploybus/__init__.py")
[[ -n $VERSION ]] || die "no __version__ in deploybus/__init__.py"
DEB_VERSION=${DEB_VERSION:-$VERSION-1}

if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
    SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null) \
        || die "not a git checkout: set SOURCE_DATE_EPOCH"
fi
export SOURCE_DATE_EPOCH
COMMIT=$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

BUILD=$(mktemp -d /tmp/deploybus-deb.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
SRC=$BUILD/deploybus-$VERSION
mkdir -p "$SRC"

# the files of the tree that go into a package
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard -- \
    setup.cfg pyproject.toml README.md CHANGELOG.md deploybus daemons frontend docs packaging \
    | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
    | tar --null -T - -cf -) | tar -C "$SRC" -xf -
cp -a "$SRC/packaging/debian" "$SRC/debian"

# the deploybus wheel, built from the copy
mkdir -p "$SRC/debian/wheels"
(cd "$BUILD" && PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation \
    --no-index -w "$SRC/debian/wheels" "$SRC") || die "building the deploybus wheel failed"
rm -rf "$SRC/build" "$SRC"/*.egg-info

# debian/changelog: the version, and the commit's date
cat >"$SRC/debian/changelog" <<CHANGELOG
deploybus ($DEB_VERSION) unstable; urgency=medium

  * deploybus $VERSION, from commit $COMMIT (CHANGELOG.md has what changed).

 -- deploybus developers <deploybus@example.org>  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")
CHANGELOG

echo "build-deb: building deploybus $DEB_VERSION (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH) in $SRC" >&2
(cd "$SRC" && DEPLOYBUS_WHEELHOUSE=$WHEELHOUSE DEB_BUILD_OPTIONS="nocheck ${DEB_BUILD_OPTIONS:-}" \
    dpkg-buildpackage -b --no-sign ${PROFILES:+-P"$PROFILES"} 2>&1 | while IFS= read -r line; do printf "%(%T)T %s\n" -1 "$line"; done >"$BUILD/build.log"; exit "${PIPESTATUS[0]}") || {
    tail -n 60 "$BUILD/build.log" >&2
    die "dpkg-buildpackage failed (the last lines above)"
}

mkdir -p "$OUT"
cp "$BUILD/build.log" "$OUT/build.log"
for deb in "$BUILD"/*.deb; do
    name=$(basename "$deb")
    rm -f "$OUT/${name%%_*}"_*.deb
    cp "$deb" "$OUT/"
    echo "$OUT/$name"
done
