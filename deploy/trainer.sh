#!/bin/sh
# The compose `trainer`: `make models` into /models (a named volume) for the default
# models missing there (STEPWISE_MODELS: other names); nothing when all are there.
# Arguments go to make (a training budget: FLAGS_default_lenet5="--epochs 1").
# Checkpoints live in the container only: once exported, serving needs nothing else.
set -eu
REPO=${STEPWISE_MODEL_REPOSITORY:-/models}
MODELS=${STEPWISE_MODELS:-$(make -qp -f Makefile 2>/dev/null | sed -n 's/^MODELS := //p' | head -n 1)}
missing=""
for m in $MODELS; do
    [ -f "$REPO/$m/1/model.json" ] || missing="$missing $m"
done
if [ -z "$missing" ]; then
    echo "trainer: every model is in $REPO ($MODELS); nothing to train"
    exit 0
fi
missing=${missing# }
echo "trainer: building $missing into $REPO (make models)"
exec make models MODELS="$missing" REPO="$REPO" CKPT=/tmp/checkpoints "$@"
