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
# $REPO/.complete names the models once all are there: what a server waiting for the
# repository (deploy/k8s: its init container) waits for.
if [ -z "$missing" ]; then
    echo "trainer: every model is in $REPO ($MODELS); nothing to train"
    echo "$MODELS" > "$REPO/.complete"
    exit 0
fi
missing=${missing# }
echo "trainer: building $missing into $REPO (make models)"
rm -f "$REPO/.complete"
make models MODELS="$missing" REPO="$REPO" CKPT=/tmp/checkpoints "$@"
echo "$MODELS" > "$REPO/.complete"
