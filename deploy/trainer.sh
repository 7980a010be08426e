#!/bin/sh
# The compose `trainer`: `make models` into /models (a named volume), unless every
# default model is already there. Checkpoints live in the container only: once exported,
# serving needs nothing else, and a rerun with the models present skips all training.
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
echo "trainer: building$missing into $REPO (make models)"
exec make models REPO="$REPO" CKPT=/tmp/checkpoints "$@"
