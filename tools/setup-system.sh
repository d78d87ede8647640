#!/usr/bin/env bash
# System packages the tests need (a real Prometheus server for the serving tests).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v prometheus >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends prometheus
fi
