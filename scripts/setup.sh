# Sourced by the Fashion-MNIST scripts: creates .venv when missing, sets $data to a directory holding
# Fashion-MNIST's four IDX files (FASHION_MNIST_DIR, or the Debian package dataset-fashion-mnist, installed if missing)
# and preloads tcmalloc (Debian package libgoogle-perftools4, installed if missing; MOBILEVIT_TCMALLOC=0 turns it off):
# glibc's malloc hands large blocks back and faults them in again every step, tcmalloc keeps them (training steps
# 1.2-1.4x faster on 2-core CPUs, README).
[ -x .venv/bin/mobilevit ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e .; }

install_deb() {  # the Debian package $1 (with sudo when not root)
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "$1"
}

data=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if ! ls "$data"/t10k-labels-idx1-ubyte* >/dev/null 2>&1; then
  echo "Fashion-MNIST not found in $data: installing the Debian package dataset-fashion-mnist" >&2
  install_deb dataset-fashion-mnist
fi

if [ "${MOBILEVIT_TCMALLOC:-1}" != 0 ]; then
  tcmalloc=/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4
  if [ ! -f "$tcmalloc" ]; then
    echo "installing the Debian package libgoogle-perftools4 (tcmalloc; MOBILEVIT_TCMALLOC=0 skips it)" >&2
    install_deb libgoogle-perftools4 >&2 ||
      echo "warning: could not install tcmalloc; training runs with glibc's malloc, 1.2-1.4x slower" >&2
  fi
  if [ -f "$tcmalloc" ]; then export LD_PRELOAD=$tcmalloc; fi
fi
