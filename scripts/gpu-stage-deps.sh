#!/usr/bin/env bash
# Packs this project's own Python dependencies (py3.12 wheels; the GPU image has torch,
# transformers and, once staged, vLLM) into .gpu-stage/c/ for the lent GPU machine, which has no
# network. botocore's data for services other than S3/STS is dropped to fit the 64 MiB carry.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
pkgs=(sqlalchemy alembic mako celery kombu billiard vine amqp click-didyoumean click-repl
      click-plugins python-dateutil tzdata tzlocal prompt_toolkit wcwidth pydantic-settings
      python-dotenv boto3 botocore s3transfer jmespath rich markdown-it-py mdurl pygments pytest
      pluggy iniconfig pytest-timeout greenlet redis psycopg psycopg-binary click six urllib3
      fastapi-offline platformdirs)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/whl" "${pkgs[@]}"
python3 -m pip install -q --no-deps --no-compile "${plat[@]}" --target "$work/site" "$work"/whl/*.whl
find "$work/site/botocore/data" -mindepth 1 -maxdepth 1 -type d \
  ! -name s3 ! -name sts ! -name s3control -exec rm -rf {} +
mkdir -p .gpu-stage/c
tar -C "$work/site" -cf - . | xz -6 -T2 > .gpu-stage/c/C.tar.xz
cat > .gpu-stage/c/env.sh <<'SH'
# Our own Python deps for the GPU machine; source after .gpu-stage/b/env.sh.
if [ ! -f /tmp/site2/.c-done ]; then
  mkdir -p /tmp/site2 && xz -dc .gpu-stage/c/C.tar.xz | tar -C /tmp/site2 -xf - && touch /tmp/site2/.c-done
fi
export PYTHONPATH=$PYTHONPATH:/tmp/site2:$PWD
SH
du -sh .gpu-stage/c
