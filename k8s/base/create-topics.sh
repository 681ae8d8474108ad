#!/usr/bin/env bash
# Create advrec's Kafka topics (idempotent). Runs in the apache/kafka image: the k8s Job
# (topics-job.yaml) and the docker-compose `topics` service both run this file.
#
# Env: ADVREC_BROKER (kafka://host:port[,host:port]), ADVREC_PARTITIONS (partitions of
# `clicks`, default 8), ADVREC_REPLICATION (replication factor, default 1: a single
# broker), WAIT_SECONDS (how long to wait for the broker, default 300),
# ADVREC_TOPIC_BUNDLES / ADVREC_TOPIC_CHECKPOINTS / ADVREC_TOPIC_FLAGS (model-bundles /
# trainer-checkpoints / user-flags). The
# ADVREC_ names are the app's settings, so topics and Faust's own changelogs agree.
# Faust creates only its internal topics (changelogs, repartition); source topics must exist
# with the right partition count before a worker starts, or its agent crash-loops.
set -euo pipefail

KAFKA_BIN=${KAFKA_BIN:-/opt/kafka/bin}
BOOTSTRAP=${ADVREC_BROKER:-kafka://kafka:9092}
BOOTSTRAP=${BOOTSTRAP//kafka:\/\//}
PARTITIONS=${ADVREC_PARTITIONS:-8}
RF=${ADVREC_REPLICATION:-1}
WAIT_SECONDS=${WAIT_SECONDS:-300}

topics() { "$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" "$@"; }

deadline=$((SECONDS + WAIT_SECONDS))
until topics --list >/dev/null 2>&1; do
  if ((SECONDS >= deadline)); then
    echo "broker $BOOTSTRAP not reachable after ${WAIT_SECONDS}s; last attempt:" >&2
    topics --list >&2 || true
    exit 1
  fi
  echo "waiting for broker $BOOTSTRAP ..."
  sleep 5
done

# create NAME PARTITIONS [CONFIG=VALUE ...]
create() {
  local name=$1 partitions=$2
  shift 2
  local configs=()
  for kv in "$@"; do configs+=(--config "$kv"); done
  topics --create --if-not-exists --topic "$name" --partitions "$partitions" \
    --replication-factor "$RF" "${configs[@]}"
  # --if-not-exists keeps an existing topic as it is: a different partition count there
  # breaks key routing, so refuse to go on rather than start workers against it.
  local actual
  actual=$(topics --describe --topic "$name" | grep -o 'PartitionCount: *[0-9]*' | grep -o '[0-9]*$')
  if [[ "$actual" != "$partitions" ]]; then
    echo "topic $name has $actual partitions, expected $partitions" >&2
    exit 1
  fi
  echo "topic $name: $partitions partitions, replication $RF"
}

# Click events, key = user id.
create clicks "$PARTITIONS" retention.ms=604800000
# Rejected events with their reason; kept longer for inspection.
create clicks-dlq "$PARTITIONS" retention.ms=1209600000
# Mini-batches for the trainer. One partition: the group assigns it to exactly one trainer,
# the active one; the others stand by.
create train-batches 1 retention.ms=86400000
# Model bundles for every pod and the active trainer's checkpoints, as chunks, manifests and a
# pointer (advrec/channel.py). One partition each: one total order. Compacted down to the last
# few versions (the trainer tombstones older ones); segments roll every 10 min or 64 MiB so
# compaction keeps up, tombstones stay a day, records up to 2 MiB (chunks are 512 KiB). The
# same settings as advrec.topics.CHANNEL_CONFIG (a test compares them).
CHANNEL="cleanup.policy=compact min.cleanable.dirty.ratio=0.1 segment.ms=600000
  segment.bytes=67108864 delete.retention.ms=86400000 max.message.bytes=2097152"
# shellcheck disable=SC2086  # the settings are meant to split into arguments
create "${ADVREC_TOPIC_BUNDLES:-model-bundles}" 1 $CHANNEL
# shellcheck disable=SC2086
create "${ADVREC_TOPIC_CHECKPOINTS:-trainer-checkpoints}" 1 $CHANNEL
# Users the trainer's fake-user detector flagged and the admin re-admitted (advrec/flags.py):
# keyed by user, compacted to the latest record per user.
create "${ADVREC_TOPIC_FLAGS:-user-flags}" 1 cleanup.policy=compact
# The catalogue (advrec/catalogue.py): one record per item id, keyed by it and compacted to the
# newest; a tombstone deletes an item and stays a day. One partition: a catalogue changes
# slowly and its readers get one total order (advrec.topics.ITEMS_CONFIG, a test compares).
create items 1 cleanup.policy=compact delete.retention.ms=86400000
# Catalogue records that break the contract, with their reason; kept like clicks-dlq.
create items-dlq 1 retention.ms=1209600000
