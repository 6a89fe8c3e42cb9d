#!/usr/bin/env bash
# systemd-analyze verify with warnings as failures: anything on stderr fails.
set -euo pipefail
cd "$(dirname "$0")"
err=$(mktemp)
trap 'rm -f "$err"' EXIT
if ! systemd-analyze verify ./forgebottle.service 2>"$err" || [ -s "$err" ]; then
  cat "$err" >&2
  echo "deploy/forgebottle.service: systemd-analyze verify reported problems" >&2
  exit 1
fi
echo "deploy/forgebottle.service: verified"
