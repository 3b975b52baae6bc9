#!/usr/bin/env bash
# What the JS runtime's tests need on a fresh machine: Node.js >= 20, Chromium (for the web page
# test), the pinned node packages (npm ci, from package-lock.json) and the TypeScript build.
set -euo pipefail
cd "$(dirname "$0")"
missing=()
command -v node >/dev/null || missing+=(nodejs npm)
[ -n "${CHROMIUM:-}" ] && [ -x "${CHROMIUM}" ] || command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "[setup] installing ${missing[*]} with apt-get"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "runtimes/js/setup.sh: node $(node --version) is too old; install Node.js 20 or newer (https://nodejs.org)." >&2
  exit 2
fi
# onnxruntime-node's install script fetches CUDA binaries from api.nuget.org unless told not to
# (.npmrc says so too, for a bare `npm ci`; newer npm versions will stop reading that key).
export ONNXRUNTIME_NODE_INSTALL=skip
npm ci --no-audit --no-fund --loglevel=error
npm run build
