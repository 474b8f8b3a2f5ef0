#!/usr/bin/env bash
# Install the slmops edge agent as a systemd service.
#
#   sudo deploy/install-agent.sh --control-plane https://cp.example.com --token slmops_enr_...
#
# Creates the slmops-agent system user, a venv in /opt/slmops/venv with this checkout installed
# (llama-cpp-python built portably by .ci/install-llama-cpp unless --no-gguf), /etc/slmops/agent.toml
# (0640, root:slmops-agent) and /var/lib/slmops-agent (0700), then enables and starts the unit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/slmops
CONFIG_DIR=/etc/slmops
DATA_DIR=/var/lib/slmops-agent
USER_NAME=slmops-agent
CONTROL_PLANE=""
TOKEN=""
WITH_GGUF=1
START=1

usage() { sed -n '2,8p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --control-plane) CONTROL_PLANE="$2"; shift 2 ;;
    --token) TOKEN="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --no-gguf) WITH_GGUF=0; shift ;;
    --no-start) START=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option: $1" >&2; usage 2 ;;
  esac
done

[[ $EUID -eq 0 ]] || { echo "run as root (it creates a user and a systemd unit)" >&2; exit 1; }
command -v systemctl >/dev/null || { echo "systemd is required" >&2; exit 1; }

id -u "$USER_NAME" >/dev/null 2>&1 || useradd --system --home-dir "$DATA_DIR" --shell /usr/sbin/nologin "$USER_NAME"
install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$DATA_DIR"
install -d -m 0755 "$CONFIG_DIR" "$PREFIX"

if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
  python3 -m venv "$PREFIX/venv"
fi
"$PREFIX/venv/bin/pip" install --quiet --upgrade pip
"$PREFIX/venv/bin/pip" install --quiet "$REPO"
if [[ $WITH_GGUF -eq 1 ]]; then
  # Portable build (GGML_NATIVE=OFF): the native one crashes on quantized models on some CPUs.
  PYTHON="$PREFIX/venv/bin/python" "$REPO/.ci/install-llama-cpp"
fi

if [[ ! -f "$CONFIG_DIR/agent.toml" ]]; then
  umask 027
  {
    echo "data_dir = \"$DATA_DIR\""
    echo "listen_host = \"127.0.0.1\""
    echo "listen_port = 8088"
    [[ -n "$CONTROL_PLANE" ]] && echo "control_plane_url = \"$CONTROL_PLANE\""
    [[ -n "$TOKEN" ]] && echo "enrollment_token = \"$TOKEN\""
    echo "keep_versions = 2"
    echo "telemetry_window_s = 60"
  } > "$CONFIG_DIR/agent.toml"
  chown root:"$USER_NAME" "$CONFIG_DIR/agent.toml"
  chmod 0640 "$CONFIG_DIR/agent.toml"
fi

unit_src="$REPO/deploy/systemd/slmops-agent.service"
sed "s#/opt/slmops/venv#$PREFIX/venv#g" "$unit_src" > /etc/systemd/system/slmops-agent.service
systemctl daemon-reload
systemctl enable slmops-agent.service
if [[ $START -eq 1 ]]; then
  systemctl restart slmops-agent.service
  systemctl --no-pager status slmops-agent.service || true
fi
echo "installed: config $CONFIG_DIR/agent.toml, data $DATA_DIR, logs: journalctl -u slmops-agent"
