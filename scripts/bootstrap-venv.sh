#!/bin/sh
# Create (or update) the project's virtual environment and install splitpilot
# into it, editable, with the test extras. Usage: bootstrap-venv.sh PYTHON VENV
set -eu
python=${1:-python3}
venv=${2:-.venv}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bootstrap-venv: $python is missing or older than 3.11; fix: make PYTHON=/path/to/python3.11+" >&2
    exit 1
fi
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    # Debian's own python3 ships venv/ensurepip in a separate package.
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        minor=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        echo "bootstrap-venv: installing python$minor-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "python$minor-venv" >/dev/null
    else
        echo "bootstrap-venv: $python has no venv module; fix: apt-get install python3-venv" >&2
        exit 1
    fi
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "bootstrap-venv: creating $venv"
    "$python" -m venv "$venv"
fi
echo "bootstrap-venv: installing splitpilot and its test dependencies into $venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e '.[broker,condor,xrootd,test]'
echo "bootstrap-venv: ready ($("$venv/bin/splitpilot" --version))"
