#!/bin/sh
# Install everything the test suite needs (only what is absent), then run the whole suite.
#   Debian packages: dcmtk (storescu/echoscu/storescp), orthanc (the PACS) and orthanc-dicomweb
#   (its DICOMweb plugin), dicom3tools (dciodvfy), openssl (test CAs), chromium (the dashboard in
#   a real browser), prometheus (promtool for the alert rules), systemd (systemd-analyze verify)
#   Python: a virtual environment in .venv with this package and its [test] extra
# Extra arguments go to pytest, e.g. `sh scripts/test.sh tests/unit -q`.
set -eu
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

missing=""
command -v python3 >/dev/null 2>&1 || missing="$missing python3 python3-venv"
[ -x /usr/bin/storescu ] || missing="$missing dcmtk"
[ -x /usr/sbin/Orthanc ] || missing="$missing orthanc"
[ -x /usr/bin/dciodvfy ] || missing="$missing dicom3tools"
[ -x /usr/bin/curl ] || missing="$missing curl"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
[ -x /usr/bin/openssl ] || missing="$missing openssl"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -x /usr/bin/promtool ] || missing="$missing prometheus"
[ -x /usr/bin/systemd-analyze ] || missing="$missing systemd"
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

# A usable venv has pip: Debian's python3 without python3-venv leaves one without it.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    python3 -m venv --clear "$VENV" 2>/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        python3 -m venv --clear "$VENV"
    }
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
exec "$VENV/bin/python" -m pytest "$@"
