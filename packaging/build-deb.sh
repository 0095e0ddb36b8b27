#!/usr/bin/env bash
# `make deb`: build/deb/llmosd_<version>_<arch>.deb — the application in a self-contained virtual
# environment under /opt/llmosd on the system's python3 (so it needs no PyPI at install time and
# no Debian packaging of its thirty dependencies), the systemd units, a conffile, and the default
# models as an OCI archive (SEED_ARCHIVE=path to reuse one). Build on the release you install on:
# the venv is tied to that release's python3 minor version, which the package depends on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${DEB_PYTHON:-/usr/bin/python3}
OUT=${DEB_OUT:-build/deb}
SEED_ARCHIVE=${SEED_ARCHIVE:-}
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
HOST_ARCH=$(dpkg --print-architecture)
ARCH=${ARCH:-$HOST_ARCH}   # another one (make deb ARCH=arm64) takes that machine's wheels from PyPI
PYMINOR=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
ROOT="$OUT/root"
rm -rf "$ROOT" && mkdir -p "$ROOT/opt" "$ROOT/DEBIAN"

echo "venv: /opt/llmosd on $PY ($PYMINOR)"
"$PY" -m venv "$ROOT/opt/llmosd"
"$ROOT/opt/llmosd/bin/pip" install -q --no-compile --upgrade pip
if [ "$ARCH" = "$HOST_ARCH" ]; then
    "$ROOT/opt/llmosd/bin/pip" install -q --no-compile .
else
    echo "cross: $ARCH wheels for python $PYMINOR"
    "${SEED_PYTHON:-.venv/bin/python}" packaging/cross_venv.py "$ROOT/opt/llmosd" "$ARCH" "$PYMINOR"
fi
STAGED=$(cd "$ROOT/opt/llmosd" && pwd)
# the venv was made here and will live at /opt/llmosd: its scripts and pyvenv.cfg name the path
grep -rlI --null "$STAGED" "$ROOT/opt/llmosd/bin" "$ROOT/opt/llmosd/pyvenv.cfg" | xargs -0 sed -i "s#$STAGED#/opt/llmosd#g"
find "$ROOT/opt/llmosd" -name __pycache__ -type d -prune -exec rm -rf {} +   # compiled by postinst
find "$ROOT/opt/llmosd" -name direct_url.json -delete   # it names this checkout
# wheels' shared objects are not executable (Debian policy 10.2); they are not stripped either: many are
# patched by auditwheel, and strip can break a patchelf-ed object
find "$ROOT/opt/llmosd" -type f \( -name '*.so' -o -name '*.so.*' \) -exec chmod 0644 {} +
if grep -rlI "$STAGED" "$ROOT/opt/llmosd" >/dev/null; then
    echo "error: the build path is still named in:" >&2; grep -rlI "$STAGED" "$ROOT/opt/llmosd" >&2; exit 1
fi

install -D -m 0644 llmosd/systemd/units/llmosd.service "$ROOT/usr/lib/systemd/system/llmosd.service"
install -D -m 0644 llmosd/systemd/units/llmosd.socket "$ROOT/usr/lib/systemd/system/llmosd.socket"
install -D -m 0644 llmosd/systemd/units/llmosd.sysusers "$ROOT/usr/lib/sysusers.d/llmosd.conf"
install -D -m 0644 packaging/debian/config.toml "$ROOT/etc/llmosd/config.toml"
install -D -m 0644 README.md "$ROOT/usr/share/doc/llmosd/README.md"
install -D -m 0644 packaging/debian/copyright "$ROOT/usr/share/doc/llmosd/copyright"
install -D -m 0644 packaging/debian/lintian-overrides "$ROOT/usr/share/lintian/overrides/llmosd"
printf 'llmosd (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- llmosd maintainers <maintainers@llmosd.example.com>  %s\n' \
    "$VERSION" "$VERSION" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" \
    | gzip -9n > "$ROOT/usr/share/doc/llmosd/changelog.gz"
mkdir -p "$ROOT/usr/bin" && ln -s /opt/llmosd/bin/llmosd "$ROOT/usr/bin/llmosd"

mkdir -p "$ROOT/usr/share/llmosd"
if [ -n "$SEED_ARCHIVE" ]; then
    cp "$SEED_ARCHIVE" "$ROOT/usr/share/llmosd/models.tar"
else
    # On arm64 (NEON kernels) SmolLM2's int4, carried from its Q4_1 blocks, reached a top-1 agreement of
    # 0.93 with PyTorch, below the gate's 0.95, and int8 1.00 (qemu-user's aarch64, 2026-12-07): the
    # archive for arm64 boxes holds int8, which the first start re-checks there (scheduler/portable.py).
    precision=auto; [ "$ARCH" = arm64 ] && precision=int8
    "${SEED_PYTHON:-.venv/bin/python}" packaging/seed_archive.py "$ROOT/usr/share/llmosd/models.tar" --precision "$precision"
fi
chmod 0644 "$ROOT/usr/share/llmosd/models.tar"

for script in postinst prerm postrm; do install -m 0755 "packaging/debian/$script" "$ROOT/DEBIAN/$script"; done
echo /etc/llmosd/config.toml > "$ROOT/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" \
    -e "s/@PYTHON_DEPENDS@/python3 (>= $PYMINOR), python3 (<< $PYNEXT)/" \
    packaging/debian/control.in > "$ROOT/DEBIAN/control"
DEB="$OUT/llmosd_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zgzip -z6 --build "$ROOT" "$DEB" >/dev/null
echo "$DEB ($(du -h "$DEB" | cut -f1), installed $((SIZE / 1024)) MiB)"
