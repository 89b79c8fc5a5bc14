#!/usr/bin/env bash
# Build docker/Dockerfile where there is no Docker daemon and no Docker Hub, then run `recpost --help`,
# a tiny fit, test, export and recommend inside the image. Daemonless: podman (buildah inside) with
# chroot isolation; the base image is a Debian root file system made with debootstrap, so only a
# Debian mirror and PyPI need to be reachable.
#
#   docker/build_local.sh                   # as root, from the repository root (minutes: torch and the deps are downloaded)
#
# Needs: podman and runc (Debian: apt-get install podman runc), debootstrap (unless BASE_IMAGE is given). Settings:
#   IMAGE            the tag to build (default recpost:0.1.0)
#   BASE_IMAGE       a base image podman can pull or already has (e.g. python:3.11-slim-bookworm); default: a
#                    Debian bookworm (Python 3.11) made with debootstrap, imported as localhost/recpost-base:bookworm
#   DEBIAN_MIRROR    for debootstrap (default http://deb.debian.org/debian)
#   EXTRA_CA_DIR     *.crt files the debootstrap base trusts besides Debian's (pip gets PIP_CERT): a
#                    TLS-intercepting proxy's CA (default /usr/local/share/ca-certificates, this host's own)
#   TORCH_WHEELS     a folder holding the torch wheel to install (e.g. /opt/wheels with torch-2.13.0+cpu-*.whl),
#                    served to the build as a package index on 127.0.0.1: for machines that reach PyPI but not
#                    download.pytorch.org.
#   TORCH_INDEX_URL  otherwise, where torch comes from (default the Dockerfile's: PyTorch's CPU index;
#                    https://pypi.org/simple gives the CUDA build, e.g. with IMAGE=recpost:0.1.0-cuda)
#   WORK             scratch folder (default /tmp/recpost-image): the base's root file system, the tiny run
#   RUN_OPTS         options for `podman run`; default: none, or, where a container cannot start so, runc with
#                    the host's own limits (crun refuses hosts with cgroup v1 and v2 mounted together, and
#                    podman's default ulimits need CAP_SYS_RESOURCE, which some VMs withhold even from root)
set -euo pipefail

IMAGE="${IMAGE:-recpost:0.1.0}"
WORK="${WORK:-/tmp/recpost-image}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
EXTRA_CA_DIR="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
TORCH_INDEX_PORT="${TORCH_INDEX_PORT:-8765}"
LOCAL_BASE=localhost/recpost-base:bookworm
cd "$(dirname "$0")/.."
mkdir -p "$WORK"

build_args=()
if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE="$LOCAL_BASE"
  if ! podman image exists "$LOCAL_BASE"; then
    echo "== base image: debootstrap bookworm (python3, python3-venv) -> $LOCAL_BASE"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" "$DEBIAN_MIRROR"
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    changes=(--change 'CMD ["/bin/bash"]')
    if compgen -G "$EXTRA_CA_DIR/*.crt" > /dev/null; then
      cp "$EXTRA_CA_DIR"/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/"
      chroot "$WORK/rootfs" update-ca-certificates
      changes+=(--change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")  # pip's own bundle lacks them
    fi
    tar -C "$WORK/rootfs" -c . | podman import "${changes[@]}" - "$LOCAL_BASE"
    rm -rf "$WORK/rootfs"
  fi
fi
build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

if [ -n "${TORCH_WHEELS:-}" ]; then
  # A PEP 503 index (<index>/torch/<wheel>) over HTTP on the loopback, which the build shares (--network host).
  index="$WORK/torch-index"
  rm -rf "$index" && mkdir -p "$index/torch"
  ln "$TORCH_WHEELS"/torch-*.whl "$index/torch/" 2>/dev/null || cp "$TORCH_WHEELS"/torch-*.whl "$index/torch/"
  python3 -m http.server "$TORCH_INDEX_PORT" --bind 127.0.0.1 --directory "$index" > "$WORK/torch-index.log" 2>&1 &
  server=$!
  trap 'kill "$server"' EXIT
  build_args+=(--build-arg "TORCH_INDEX_URL=http://127.0.0.1:$TORCH_INDEX_PORT")
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi

echo "== podman build $IMAGE (base $BASE_IMAGE)"
podman build --isolation chroot --network host --pull=never "${build_args[@]}" -f docker/Dockerfile -t "$IMAGE" .

echo "== checks inside $IMAGE"
runtime=()  # global podman options
if [ -z "${RUN_OPTS+set}" ]; then
  RUN_OPTS=""
  if ! podman run --rm --entrypoint true "$IMAGE" 2> "$WORK/run-probe.log"; then
    echo "podman run failed with its defaults ($(tail -n 1 "$WORK/run-probe.log")); using runc and the host's limits"
    runtime=(--runtime runc)
    RUN_OPTS="--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=32768:32768"
  fi
fi
read -r -a run_opts <<< "$RUN_OPTS"
run() { podman "${runtime[@]}" run --rm "${run_opts[@]}" --network none -v "$WORK/runs:/app/runs" "$IMAGE" "$@"; }
run_python() { podman "${runtime[@]}" run --rm "${run_opts[@]}" --network none --entrypoint python "$IMAGE" "$@"; }
rm -rf "$WORK/runs" && mkdir -p "$WORK/runs" && chown 1000:1000 "$WORK/runs"
run_python -c \
  "import sys, torch, recpost; print('python', sys.version.split()[0], '| torch', torch.__version__, '| recpost', recpost.__version__)"
run --help > "$WORK/help.txt" && head -n 5 "$WORK/help.txt"
tiny=(--config configs/pretrain/sim.yaml --data.source.init_args.world.n_users 300
      --data.source.init_args.world.n_items 200 --trainer.max_epochs 2 --trainer.default_root_dir runs/tiny)
run fit "${tiny[@]}"
ckpt=runs/tiny/lightning_logs/version_0/checkpoints/best.ckpt
run test "${tiny[@]}" --ckpt_path "$ckpt"
run export --ckpt_path "$ckpt" --out runs/tiny-model
echo '{"user_id": "new-user", "items": [1, 2, 3, 999999]}' > "$WORK/runs/histories.jsonl"
run recommend --model runs/tiny-model --histories runs/histories.jsonl --k 5
echo "== image"
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"
