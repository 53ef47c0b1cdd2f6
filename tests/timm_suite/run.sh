#!/usr/bin/env bash
# timm's own model test-suite (tests/test_models.py from the sdist of the INSTALLED timm version)
# run on the zoo's models: `import zoo` in its conftest, our models in its filter lists
# (patch_suite.py), selected with `-k zoo_`. The only network access is pip fetching that sdist.
#
#   tests/timm_suite/run.sh                 # every test timm applies to our models
#   tests/timm_suite/run.sh -k "zoo_ and forward"    # extra pytest args go to pytest (last -k wins)
#
# Env: TIMM_SUITE_DIR (where the sdist is unpacked; default ${TMPDIR:-/tmp}/zoo-timm-suite-VERSION,
# kept between runs), TIMM_SUITE_TIMEOUT (seconds for the whole run, default 7200; with
# pytest-timeout installed each test also gets timm's own per-test limits),
# TIMM_SUITE_RESULTS (the results folder, default zoo/bench/results; "none" records nothing),
# TIMM_SUITE_NAME (the results stem: default timm_suite for the whole run, timm_suite_selection
# when pytest arguments select part of it).
#
# pytest's summary line, the command and the machine are recorded by `python -m zoo.bench suite
# --from-log` as RESULTS/NAME.{md,csv,json}; the documentation's timm-suite figures are copied
# from there (docs/reliability.md), never typed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# The zoo of THIS checkout, whatever `pip install -e` last pointed at (the suite runs elsewhere).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python}"
version="$("$python" -c 'import timm; print(timm.__version__)')"
dir="${TIMM_SUITE_DIR:-${TMPDIR:-/tmp}/zoo-timm-suite-$version}"
limit="${TIMM_SUITE_TIMEOUT:-7200}"

mkdir -p "$dir"
sdist="$dir/timm-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    "$python" -m pip download -q --no-deps --no-binary :all: "timm==$version" -d "$dir" \
        || { echo "timm suite: could not fetch timm==$version's sdist with pip" >&2; exit 2; }
fi
# A fresh copy of tests/ every run, patched by this checkout's patch_suite.py.
rm -rf "$dir/tests"
tar -xzf "$sdist" -C "$dir" --strip-components=1 "timm-$version/tests"
# pytest's rootdir/config for the copy, so that nothing of ours applies there (setup.cfg's
# "-m 'not slow'" and --strict-markers); timm's markers are its pyproject.toml's, not copied here.
printf '[pytest]\nfilterwarnings =\n    ignore::pytest.PytestUnknownMarkWarning\n' > "$dir/pytest.ini"
"$python" "$here/patch_suite.py" "$dir/tests"

args=(-q -p no:cacheprovider -rfEs -k zoo_)
if "$python" -c 'import pytest_timeout' 2>/dev/null; then
    args+=(--timeout=600)
fi
results="${TIMM_SUITE_RESULTS:-$repo/zoo/bench/results}"
name="${TIMM_SUITE_NAME:-timm_suite$([ "$#" -gt 0 ] && echo _selection)}"
label="$("$python" -c 'import shlex, sys; print(shlex.join(["tests/timm_suite/run.sh", *sys.argv[1:]]))' "$@")"
log="$dir/last_run.log"
cd "$dir"
set +e
timeout "$limit" "$python" -m pytest tests/test_models.py "${args[@]}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 124 ]; then
    echo "timm suite: stopped after ${limit}s (TIMM_SUITE_TIMEOUT); nothing recorded" >&2
elif [ "$results" != none ]; then
    # a run cut short has no summary line: suite says so and records nothing; the suite's status stands
    "$python" -m zoo.bench suite --from-log "$log" --label "$label" --name "$name" --results "$results" || true
fi
exit "$rc"
