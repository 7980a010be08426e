#!/bin/sh
# The compose `loadtest`: wait until the load balancer answers gRPC health checks with
# SERVING, then the concurrency sweep of `python -m loadtest` through it, once for
# Classify and once for Generate; JSON, CSV and PNG land in $RESULTS/<rpc>/.
set -eu
TARGET=${TARGET:-lb:8001}
RESULTS=${RESULTS:-/results}
CONCURRENCY=${CONCURRENCY:-1,2,4,8,16,32}
STREAM_CONCURRENCY=${STREAM_CONCURRENCY:-1,4,16,64}
MAX_TOKENS=${MAX_TOKENS:-128}
COMMON="--target $TARGET --wait-healthy 300 --workers ${WORKERS:-2} --measurement-interval ${INTERVAL_MS:-3000}"
python -m loadtest $COMMON --rpc classify --concurrency "$CONCURRENCY" \
    --output-dir "$RESULTS/classify" "$@"
python -m loadtest $COMMON --rpc generate --concurrency "$STREAM_CONCURRENCY" \
    --max-tokens "$MAX_TOKENS" --output-dir "$RESULTS/generate" "$@"
echo "loadtest: results in $RESULTS/classify and $RESULTS/generate"
