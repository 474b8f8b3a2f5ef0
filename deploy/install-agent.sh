#!/usr/bin/env bash
# Install the slmops edge agent as a systemd service, from a package index or a wheel file.
#
#   sudo ./install-agent.sh --control-plane https://cp.example.com --token slmops_enr_... [--wheel slmops-X.whl]
#
# Options: --wheel FILE | --index-url URL [--version V]; --no-gguf, --onnx (runtimes); --prefix DIR; --no-start.
# Creates the slmops-agent system user, a venv in /opt/slmops/venv with slmops[agent,cli] and the
# runtimes (llama.cpp built portably unless --no-gguf), /etc/slmops/agent.toml (0640,
# root:slmops-agent) and /var/lib/slmops-agent (0700), then installs the unit the package ships.
set -euo pipefail

PREFIX=/opt/slmops
CONFIG_DIR=/etc/slmops
DATA_DIR=/var/lib/slmops-agent
USER_NAME=slmops-agent
CONTROL_PLANE=""
TOKEN=""
WHEEL=""
INDEX_URL=""
VERSION=""
WITH_GGUF=1
WITH_ONNX=0
START=1

usage() { sed -n '2,9p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --control-plane) CONTROL_PLANE="$2"; shift 2 ;;
    --token) TOKEN="$2"; shift 2 ;;
    --wheel) WHEEL="$(realpath "$2")"; shift 2 ;;
    --index-url) INDEX_URL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --no-gguf) WITH_GGUF=0; shift ;;
    --onnx) WITH_ONNX=1; shift ;;
    --no-start) START=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option: $1" >&2; usage 2 ;;
  esac
done

[[ $EUID -eq 0 ]] || { echo "run as root (it creates a user and a systemd unit)" >&2; exit 1; }
command -v systemctl >/dev/null || { echo "systemd is required" >&2; exit 1; }
[[ -z "$WHEEL" || -f "$WHEEL" ]] || { echo "no such wheel: $WHEEL" >&2; exit 2; }

# The CLI extra keeps `slmops agent status|apply|rollback` on the device; the daemon needs only `agent`.
extras=agent,cli
[[ $WITH_GGUF -eq 1 ]] && extras+=,gguf
[[ $WITH_ONNX -eq 1 ]] && extras+=,onnx
if [[ -n "$WHEEL" ]]; then
  package="slmops[$extras] @ file://$WHEEL"
else
  package="slmops[$extras]${VERSION:+==$VERSION}"
fi
pip_args=(--quiet)
[[ -n "$INDEX_URL" ]] && pip_args+=(--index-url "$INDEX_URL")
if [[ $WITH_GGUF -eq 1 ]]; then
  # llama-cpp-python built from source, portably: the native build (GGML_NATIVE=ON) crashes on
  # quantized models on some CPUs, and pip's wheel cache would hand a cached native build back.
  export CMAKE_ARGS="-DGGML_NATIVE=OFF" FORCE_CMAKE=1
  pip_args+=(--no-cache-dir --no-binary llama-cpp-python)
fi

id -u "$USER_NAME" >/dev/null 2>&1 || useradd --system --home-dir "$DATA_DIR" --shell /usr/sbin/nologin "$USER_NAME"
install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$DATA_DIR"
install -d -m 0755 "$CONFIG_DIR" "$PREFIX"

if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
  python3 -m venv "$PREFIX/venv"
fi
"$PREFIX/venv/bin/pip" install --quiet --upgrade pip
"$PREFIX/venv/bin/pip" install "${pip_args[@]}" "$package"

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

# The unit comes with the installed package (edge_agent/systemd), so it matches the code it starts.
"$PREFIX/venv/bin/python" -c \
  'from importlib.resources import files; print(files("edge_agent").joinpath("systemd/slmops-agent.service").read_text(), end="")' \
  | sed "s#/opt/slmops/venv#$PREFIX/venv#g" > /etc/systemd/system/slmops-agent.service
systemctl daemon-reload
systemctl enable slmops-agent.service
if [[ $START -eq 1 ]]; then
  systemctl restart slmops-agent.service
  systemctl --no-pager status slmops-agent.service || true
fi
echo "installed: config $CONFIG_DIR/agent.toml, data $DATA_DIR, logs: journalctl -u slmops-agent"
