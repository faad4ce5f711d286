# Sourced by the Fashion-MNIST scripts: creates .venv when missing and sets $data to a directory holding
# Fashion-MNIST's four IDX files (FASHION_MNIST_DIR, or the Debian package dataset-fashion-mnist, installed if missing).
[ -x .venv/bin/mobilevit ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e .; }

data=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if ! ls "$data"/t10k-labels-idx1-ubyte* >/dev/null 2>&1; then
  echo "Fashion-MNIST not found in $data: installing the Debian package dataset-fashion-mnist" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
