#!/bin/sh
# The compose `trainer` (and deploy/k8s's Job): `make models` into /models (a volume) for
# the default models missing there (STEPWISE_MODELS: other names); nothing when all are
# there. Arguments go to make (a training budget: FLAGS_default_lenet5="--epochs 1").
# Checkpoints live in the container only: once exported, serving needs nothing else.
# $REPO/.complete names the models once every one is there, and only then: what a
# server waiting for the repository (deploy/k8s: its init container) waits for.
set -eu
REPO=${STEPWISE_MODEL_REPOSITORY:-/models}
MODELS=${STEPWISE_MODELS:-$(make -qp -f Makefile 2>/dev/null | sed -n 's/^MODELS := //p' | head -n 1)}
if [ -z "$(echo $MODELS)" ]; then  # unquoted: blank counts as empty
    echo "trainer: no models to build (STEPWISE_MODELS, or MODELS in the Makefile)" >&2
    exit 1
fi
missing() {
    out=""
    for m in $MODELS; do
        [ -f "$REPO/$m/1/model.json" ] || out="$out $m"
    done
    echo "${out# }"
}
todo=$(missing)
if [ -z "$todo" ]; then
    echo "trainer: every model is in $REPO ($MODELS); nothing to train"
    echo "$MODELS" > "$REPO/.complete"
    exit 0
fi
echo "trainer: building $todo into $REPO (make models)"
rm -f "$REPO/.complete"
# make runs as a child, so this shell passes on a SIGTERM (as PID 1 it would ignore it).
make models MODELS="$todo" REPO="$REPO" CKPT=/tmp/checkpoints "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
status=0
wait "$child" || status=$?
if [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; then
    status=0  # the wait was cut short by a signal: wait for make itself
    wait "$child" || status=$?
fi
[ "$status" -eq 0 ] || exit "$status"
left=$(missing)
if [ -n "$left" ]; then
    echo "trainer: make models ended, but $left is still missing in $REPO" >&2
    exit 1
fi
echo "$MODELS" > "$REPO/.complete"
